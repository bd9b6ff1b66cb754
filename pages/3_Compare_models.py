"""Compare models: metrics table and overlaid ROC; all chosen models on one uploaded image."""
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from models.card import ALL, MAGNIFICATIONS, metric
from app.dashboard import (DISCLAIMER, compare_agreement, decision_rule, curves, decode_frame, model_folder, repeats_rows,
                           routing_evidence, rule1_summary)
from models.routing import resolve
from models.gradcam import CAM_BRANCHES, CAM_METHODS, cam_branches, gradcam_overlay
from app.ui_cache import cached_analysis, cached_cards, cached_heatmap, cached_model, cached_reliability
from app.viewer import VIEWER_CAPTION, frame_viewer
from models.slide import MAG_MPP
from models.uncertainty import short_uncertainty

st.set_page_config(page_title="Compare models", page_icon="⚖️", layout="wide")
st.title("Compare models")
st.caption(DISCLAIMER)
cards = cached_cards()
if not cards:
    st.error("No trained models in magnif_models/.")
    st.stop()
mag = st.selectbox("Compare at magnification", MAGNIFICATIONS, index=1, key="cmp_mag")
avail = [m for m, c in cards.items() if c.magnification == mag or (c.magnification == ALL and mag in c.per_magnification)
         or mag in c.evaluation.get("cross_magnification", {})]
chosen = st.multiselect("Models", avail, default=avail, key="cmp_models")
if len(chosen) < 1:
    st.info("Choose at least one model (two or more to compare).")
    st.stop()

served = resolve("malignancy", mag)
if served.model_id is None:
    for note in served.notes:
        st.warning(note)
if served.model_id:
    st.info(f"Routed at {mag}: **{served.model_id}**. " + " ".join(n for n in served.notes if n.startswith("Serves because")))

rows, fig = [], go.Figure()
for mid in chosen:
    c = cards[mid]
    s, t = c.summaries_at(mag)
    kind = ("pooled" if c.magnification == ALL else "own magnification" if c.magnification == mag
            else f"borrowed ({c.magnification} model)")
    row = {"model": mid, "routed": "yes" if mid == served.model_id else "", "architecture": c.architecture, "serves as": kind, "stain": (c.preprocess.stain or {}).get("method", "none")}
    r1 = rule1_summary(mid)
    for k in ("auc", "balanced_accuracy", "sensitivity", "specificity", "patient_accuracy", "ece"):
        row[k] = m.fmt() if (m := metric(s, k)) else "n/a"
        if k == "auc":  # beside the single run's AUC: what the recipe gives over 3 split seeds (rule 1)
            row["recipe's AUC over 3 split seeds (all its frames)"] = (
                (r1["auc"].fmt() + (f" [{r1['split_seeds']} split seeds only]" if r1["split_seeds"] < 3 else ""))
                if r1 else "not measured")
    row["auc with TTA"] = metric(t).fmt() if t else "not measured"
    row["patients (b/m)"] = f"{s['n_patients']['benign']}/{s['n_patients']['malignant']}"
    rows.append(row)
    cv = curves(model_folder(mid))
    cur = (cv.get("per_magnification", {}).get(mag) if c.magnification == ALL else cv.get("overall") if c.magnification == mag
           else cv.get("cross_magnification", {}).get(mag))
    if cur and "roc" in cur:
        fig.add_scatter(x=cur["roc"]["fpr"], y=cur["roc"]["tpr"], name=mid)
fig.add_scatter(x=[0, 1], y=[0, 1], name="chance", line={"dash": "dash", "color": "grey"})
fig.update_layout(title=f"Out-of-fold ROC at {mag}", xaxis_title="1 - specificity", yaxis_title="sensitivity", height=420)
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption("Values: point estimate (95% patient-bootstrap CI) on patients each model never saw (out-of-fold). "
           "Different models may rest on different folds. A borrowed model was trained at another magnification and "
           "is scored here on held-out patients' frames at this one. The column after auc is the model's recipe re-run "
           "over 3 split seeds x 5 folds (rule 1; the expander below): what one run's figure is worth.")
st.plotly_chart(fig, width="stretch")
ev = routing_evidence(mag)
if not ev.empty:
    st.markdown(f"**Why {served.model_id} serves {mag}** (the routing rule's evidence)")
    st.dataframe(ev, hide_index=True, width="stretch")
    st.caption("Each challenger's AUC advantage over the pretrained incumbent on the same out-of-fold frames, with a "
               "paired patient-bootstrap 95% CI; a challenger displaces the incumbent only when the whole CI is above zero.")

rep = repeats_rows(mag)
if not rep.empty:
    with st.expander(f"How much each recipe's figure moves: repeated CV (rule 1) on frames including {mag}"):
        st.dataframe(rep, hide_index=True, width="stretch")
        st.caption("Each trained recipe re-run with other split seeds (other folds) and, from scratch, other training "
                   "seeds, read back on the folds of the frozen references (`python -m training repeats-cv`; "
                   "README, Generalisation). The table above shows one run per model; here is how far such a figure "
                   "moves. On 38 patients differences inside these spreads are noise.")

st.subheader("All chosen models on the same image")
cm1, cm2 = st.columns(2)
method = cm1.selectbox("Heatmap method", list(CAM_METHODS), key="cmp_method")
branch_pref = cm2.selectbox("Hybrid models: explain which branch", list(CAM_BRANCHES), format_func=CAM_BRANCHES.get,
                            key="cmp_branch", help="Models with one branch always show their CNN's map.")
up = st.file_uploader("Upload one frame", type=["png", "jpg", "jpeg", "tif", "tiff"], key="cmp_upload")
if up is not None:
    data = up.getvalue()
    results, calls, panels, frame = [], [], [], None
    t0 = time.perf_counter()
    for mid in chosen:
        try:
            lm = cached_model(mid)
        except Exception as exc:
            st.error(f"{mid}: cannot load ({exc})")
            continue
        r = cached_analysis(mid, up.name, data, mag)
        if r.error:
            st.error(r.error)
            break
        results.append(r)
        calls.append({"model": mid, "decision": r.decision, "reason": r.reason if r.decision == "refer" else "",
                      "p(malignant)": round(r.p_malignant, 3) if r.p_malignant is not None else None,
                      "how often frames scored like it were malignant": short_uncertainty(r.p_malignant,
                                                                                           cached_reliability(mid)),
                      "rule": decision_rule(lm), "warnings": "; ".join(r.warnings)})
        b = branch_pref if branch_pref in cam_branches(lm) else "cnn"
        calls[-1]["heatmap"] = f"{method}, {CAM_BRANCHES[b]}"
        if r.decision_kind not in ("call", "band"):
            calls[-1]["heatmap"] = "none: refused before any call"
            continue  # no heatmap on an image refused before any call
        frame = frame or decode_frame(data, up.name)  # decoded once for all the models' overlays
        panels.append((f"{mid} ({r.decision}, p {r.p_malignant:.2f}) · {method}, {CAM_BRANCHES[b]}",
                       gradcam_overlay(frame, cached_heatmap(mid, up.name, data, method, 1, b))))
    if calls:
        # each model's call under its own decision rule, stated beside it
        st.dataframe(pd.DataFrame(calls), hide_index=True, width="stretch")
    if len(results) > 1:
        kind, text = compare_agreement(results)
        (st.success if kind == "success" else st.warning)(text)
    if results and not panels:
        st.info("No heatmaps: every model refused this image before any call.")
    if panels:
        st.plotly_chart(frame_viewer(frame, panels, columns=2, um_per_px=MAG_MPP.get(mag)), width="stretch",
                        key="cmp_viewer")
        st.caption("Each overlay is the model's map for the class 'malignant', scaled to its own maximum (compare "
                   "regions, not colours, across models). " + VIEWER_CAPTION)
    st.caption(f"{len(results)} model(s) on this frame in {time.perf_counter() - t0:.1f} s (calls and maps are cached "
               "per frame and model: a second look is instant; `python benchmarks/compare_latency.py` measures it).")
