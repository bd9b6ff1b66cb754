"""IDC patches: upload 50x50 patches (or a zip of one patient's), read p(IDC) and Grad-CAM per patch, and see the
region rebuilt from the coordinates in the names with the patient's IDC burden."""
import plotly.graph_objects as go
import streamlit as st

from app.dashboard import DISCLAIMER
from app.idc import expand_uploads, region_of, results_table
from app.ui_cache import cached_model, cached_patch_heatmap, cached_patches
from models.card import metric
from models.gradcam import colour_scale, gradcam_overlay
from models.idc import burden_with_ci
from models.routing import DefaultsError, default_model_id
from models.textsafe import csv_safe

st.set_page_config(page_title="IDC patches", page_icon="🧫", layout="wide")
st.title("IDC patches")
st.warning(DISCLAIMER)
st.markdown("Invasive ductal carcinoma (IDC) in 50x50 patches of breast whole-slide scans (the public IDC collection, "
            "names `<patient>_idx5_x<X>_y<Y>_class<0|1>.png`). This is a different question from the frame pages: "
            "where IDC sits in a slide region, not whether a 700x460 frame is malignant.")
try:
    model_id = default_model_id("idc")
except DefaultsError as exc:
    st.error(f"Routing is unavailable: {exc}")
    st.stop()
if model_id is None:
    st.error("No IDC patch model is trained. Train one with:")
    st.code("python -m training train-idc --data ../shared/data/idc --out magnif_models/idc/efficientnet_lite2_idc "
            "&& python -m training select-defaults", language="bash")
    st.stop()
try:
    lm = cached_model(model_id)
except Exception as exc:  # integrity failure or missing files: a message, not a traceback
    st.error(f"Model {model_id} could not be loaded: {exc}")
    st.stop()
auc = metric(lm.card.overall)
n_pat = lm.card.data.get("patients", "?")
st.markdown(f"Model `{model_id}` · threshold p ≥ {lm.card.threshold:.2f} → IDC-positive · temperature "
            f"{lm.card.temperature:.2f}")
if auc:
    st.caption(f"How good is this model? Patch AUC {auc.fmt()} on patches of patients it never saw "
               f"({n_pat} patients, patient-grouped cross-validation; {lm.card.recipe.get('description', '')}).")

files = st.file_uploader("Upload IDC patches (PNG) or a zip of one patient's patches",
                         type=["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp", "zip"], accept_multiple_files=True,
                         key="idc_uploads")
if not files:
    st.info("Upload patches to get p(IDC) per patch and the region map.")
    st.stop()
up = expand_uploads([(f.name, f.getvalue()) for f in files])
for line in up.refused[:20]:
    st.warning(f"Left out: {line}")
if len(up.refused) > 20:
    st.warning(f"… and {len(up.refused) - 20} more left out.")
if not up.items:
    st.error("No patches to analyse in this upload.")
    st.stop()
with st.spinner(f"Analysing {len(up.items)} patches…"):
    results = cached_patches(model_id, tuple(up.items))
for r in results:
    if r.p_idc is None:
        st.error(f"{r.name}: {r.warning}")
table = results_table(results, lm.card.threshold)
called = table[table["p_idc"].notna()]
st.markdown(f"**{len(table)} patches**: {int((called['call'] == 'IDC-positive').sum())} called IDC-positive, "
            f"{int((called['call'] == 'IDC-negative').sum())} IDC-negative, {len(table) - len(called)} not analysed.")
st.dataframe(table.drop(columns=["threshold"]), hide_index=True, width="stretch",
             column_config={"p_idc": st.column_config.ProgressColumn("p(IDC)", min_value=0.0, max_value=1.0,
                                                                      format="%.3f")})
st.download_button("Download results (CSV)", table.assign(model_id=model_id, weights_sha256=lm.card.weights_sha256)
                   .pipe(csv_safe).to_csv(index=False), "idc_patches.csv", "text/csv")

patients = sorted(p for p in called["patient"].unique() if p)
if patients:
    st.subheader("Region rebuilt from the patch coordinates")
    pat = st.selectbox("Patient", patients, key="idc_patient")
    heat, stated, pvals = region_of(table, pat)
    burden, lo, hi = burden_with_ci(pvals, lm.card.threshold)
    stated_share = float(table[(table["patient"] == pat) & table["p_idc"].notna()]["class in name"]
                         .eq("IDC-positive").mean())
    st.metric(f"IDC burden of patient {pat} (share of its {len(pvals)} patches called IDC-positive)",
              f"{burden:.0%} (95% CI {lo:.0%}–{hi:.0%})",
              help="Bootstrap over this patient's patches. Neighbouring patches are alike, so the true uncertainty is "
                   "larger than this interval.")
    st.caption(f"The patch names state {stated_share:.0%} IDC-positive (the collection's own annotation).")
    a, b = st.columns(2)
    cells = dict(colorscale="Jet", zmin=0, zmax=1, hoverongaps=False)
    a.plotly_chart(go.Figure(go.Heatmap(z=heat, colorbar={"title": "p(IDC)"}, **cells)).update_layout(
        title="p(IDC) per patch (blank: no patch uploaded)", yaxis={"autorange": "reversed", "scaleanchor": "x", "title": "y (patches of 50 px)"},
        xaxis_title="x (patches of 50 px)", height=420), width="stretch")
    b.plotly_chart(go.Figure(go.Heatmap(z=stated, colorbar={"title": "class"}, **cells)).update_layout(
        title="class stated in the names (1 = IDC-positive)", yaxis={"autorange": "reversed", "scaleanchor": "x", "title": "y (patches of 50 px)"},
        xaxis_title="x (patches of 50 px)", height=420), width="stretch")

st.subheader("Grad-CAM of one patch")
ok = [r for r in results if r.p_idc is not None]
pick = ok[st.selectbox("Patch", range(len(ok)), format_func=lambda i: ok[i].name, key="idc_pick")]
data = dict(up.items)[pick.name]
patch, heat = cached_patch_heatmap(model_id, pick.name, data)
big = patch.resize((250, 250), resample=0)
c1, c2 = st.columns(2)
c1.image(big, caption=f"{pick.name} (enlarged 5x)", width=250)
c2.image(gradcam_overlay(patch, heat, 0.45).resize((250, 250), resample=0), width=250, caption="Grad-CAM")
st.caption(f"{pick.name}: Grad-CAM for IDC-positive · p(IDC) = {pick.p_idc:.3f} · {pick.label}")
st.image(colour_scale(500, 12), width=500, caption="heatmap scale: blue = little, red = much contribution to IDC-positive")
