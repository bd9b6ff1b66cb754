"""Slides: open a whole-slide image, see its tissue mask, score its tiles at a model's physical scale, read the
heatmap, look at any tile at full resolution with its Grad-CAM, and save the slide's summary to the case history."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app.dashboard import DISCLAIMER
from app.slides import (list_server_slides, mask_overlay, properties_table, save_slide_case, server_slide_path, slide_folder,
                        store_upload, top_tiles)
from app.ui_cache import cached_model, history_store
from models.card import MAGNIFICATIONS, metric
from models.engine import make_predictor
from models.gradcam import gradcam_heatmap, gradcam_overlay
from models.routing import resolve
from models.slide import (IDC_MPP, MAG_MPP, MAX_UPSAMPLE, SlideError, TileSpec, open_slide, read_tile, target_scale,
                          tissue_mask)
from models.slide_score import SCALE_NOTE, heatmap_overlay, score_slide
from models.textsafe import md_escape

st.set_page_config(page_title="Slides", page_icon="🧻", layout="wide")
st.title("Whole-slide images")
st.warning(DISCLAIMER)
st.caption("Fields of view are cut at the scale each model was trained at; " + SCALE_NOTE + ".")

source = st.radio("Slide source", ["Upload", "Server slide folder"], horizontal=True, key="slide_source")
path = None
if source == "Upload":
    up = st.file_uploader("Upload a slide (SVS, NDPI, MRXS as a zip is not supported here, SCN, tiled TIFF)",
                          type=[s.lstrip(".") for s in (".svs", ".ndpi", ".scn", ".tif", ".tiff", ".bif", ".svslide")],
                          key="slide_upload")
    if up is not None:
        key = (up.name, up.size)
        if st.session_state.get("slide_upload_key") != key:  # written once per upload, not on every rerun
            st.session_state["slide_upload_key"] = key
            st.session_state["slide_upload_path"] = str(store_upload(up.name, up.getvalue()))
            st.session_state.pop("slide_run", None)
        path = st.session_state["slide_upload_path"]
else:
    folder = slide_folder()
    if folder is None:
        st.info("No server slide folder is configured: set BREAKHIS_SLIDES_DIR to a folder of slides on this server.")
    else:
        names = list_server_slides(folder)
        if not names:
            st.info("The configured slide folder holds no slides.")
        else:
            name = st.selectbox("Slide", names, key="slide_server_pick")
            try:
                path = str(server_slide_path(folder, name))
            except ValueError as exc:
                st.error(str(exc))
if path is None:
    st.stop()

c1, c2, c3 = st.columns(3)
task_label = c1.selectbox("Model", [f"malignancy at {m}" for m in MAGNIFICATIONS] + ["IDC patches"], key="slide_task")
task = "idc" if task_label == "IDC patches" else "malignancy"
mag = None if task == "idc" else task_label.rsplit(" ", 1)[1]
mpp_text = c2.text_input("µm/px of level 0 (only if the slide does not state it)", key="slide_mpp")
stride = c3.select_slider("Tile step", options=[0.5, 0.75, 1.0], value=1.0, key="slide_stride",
                          help="1 = tiles edge to edge; 0.5 = half overlap (4x the tiles)")
with st.expander("Tissue detection and tiling parameters"):
    m1, m2 = st.columns(2)
    min_sat = m1.slider("Minimum saturation counted as tissue (the Otsu threshold is never below it)", 0.0, 0.5, 0.07,
                        0.01, key="slide_min_sat")
    min_obj = m2.number_input("Smallest tissue piece kept (µm²)", 0, 1_000_000, 5000, 1000, key="slide_min_obj")
    min_tissue = st.slider("Share of a tile that must be tissue", 0.05, 1.0, 0.25, 0.05, key="slide_min_tissue")
    max_tiles = st.number_input("Score at most this many tiles", 1, 20000, 2000, key="slide_max_tiles")
try:
    mpp = float(mpp_text) if mpp_text.strip() else None
except ValueError:
    st.error("µm/px must be a number, e.g. 0.25 for a 40x scan or 0.5 for 20x.")
    st.stop()

try:
    slide, info = open_slide(path, mpp)
    try:
        mask = tissue_mask(slide, info, min_saturation=float(min_sat), min_object_um2=float(min_obj))
    finally:
        slide.close()
except SlideError as exc:
    st.error(str(exc))
    st.stop()
p1, p2 = st.columns([3, 2])
p1.table(properties_table(info).set_index("property"))
p2.image(mask_overlay(mask), caption=f"Tissue mask (green; {mask.mask.mean():.0%} of the slide; Otsu threshold on "
                                     f"saturation {mask.threshold:.2f}, {mask.mpp:.1f} µm per mask pixel)",
         width="stretch")
target_mpp, _ = target_scale(task, mag)
if info.mpp / target_mpp > MAX_UPSAMPLE:
    st.error(f"{'IDC patches need' if task == 'idc' else f'{mag} needs'} {target_mpp:g} µm/px; this slide is scanned at "
             f"{info.mpp:g} µm/px, so each tile would be enlarged {info.mpp / target_mpp:.1f}x (more than "
             f"{MAX_UPSAMPLE}x): refused. Reachable here: "
             + (", ".join(m for m, v in MAG_MPP.items() if info.mpp / v <= MAX_UPSAMPLE) or "none of the frame scales")
             + (", IDC" if info.mpp / IDC_MPP <= MAX_UPSAMPLE else "") + ".")
    st.stop()

route = resolve(task, mag)
if route.model_id is None:
    st.error(" ".join(route.notes))
    st.stop()
for n in route.notes:
    st.caption(n)
try:
    lm = cached_model(route.model_id)
except Exception as exc:  # integrity failure or missing files: a message, not a traceback
    st.error(f"Model {route.model_id} could not be loaded: {exc}")
    st.stop()
auc = metric(lm.card.summary_at(mag) if mag and lm.card.magnification == "all" else lm.card.overall)
st.markdown(f"Model `{route.model_id}`" + (f" · AUC {auc.fmt()} on patients it never saw" if auc else ""))

params = (path, task, mag, mpp, stride, min_tissue, int(max_tiles), min_sat, int(min_obj))
if st.button("Analyse slide", type="primary", key="slide_go") or (st.session_state.get("slide_run_params") == params):
    if st.session_state.get("slide_run_params") != params:
        bar = st.progress(0.0, text="Scoring tiles…")
        try:
            run = score_slide(path, make_predictor(lm, magnification=mag), task, mag, mpp, stride, min_tissue,
                              int(max_tiles), progress=lambda i, n: bar.progress(i / max(n, 1),
                                                                                 text=f"Scoring tile {i} of {n}"),
                              mask_params={"min_saturation": float(min_sat), "min_object_um2": float(min_obj)})
        except SlideError as exc:
            st.error(str(exc))
            st.stop()
        bar.empty()
        st.session_state["slide_run"], st.session_state["slide_run_params"] = run, params
    run = st.session_state["slide_run"]
else:
    st.info("Choose the model and press **Analyse slide**.")
    st.stop()

s = run.summary
t = s["tiles"]
share = next((v for k, v in s.items() if k.startswith("share_") and k.endswith("_of_called")), None)
what = "IDC-positive" if task == "idc" else "malignant"
lead = (f"**{t['called']} of {t['scored']} tiles called, {t['referred']} referred.** "
        + (f"Share called {what}: {share:.0%} (95% CI {s['share_ci95'][0]:.0%}–{s['share_ci95'][1]:.0%}, over tiles; "
           "neighbouring tiles are correlated, so the true uncertainty is wider)." if share is not None else
           "No tile was called."))
(st.warning if t["called"] == 0 else st.info)(lead)
if t["capped_by_max_tiles"]:
    st.warning(f"Only the first {int(max_tiles)} of {t['on_tissue']} tissue tiles were scored (the limit above).")
if s["model"]["refer_policy_note"]:
    st.caption(s["model"]["refer_policy_note"])

img, scale = heatmap_overlay(run)
tiles = run.tiles.reset_index(drop=True)
cx = (tiles["x"] + tiles["width"] / 2) * scale
cy = (tiles["y"] + tiles["height"] / 2) * scale
prob = tiles[run.prob_column].astype(float)
fig = go.Figure(go.Image(z=np.asarray(img), hoverinfo="skip"))
fig.add_trace(go.Scatter(
    x=cx, y=cy, mode="markers", customdata=np.arange(len(tiles)),
    marker=dict(size=10, color=prob, colorscale="Jet", cmin=0, cmax=1, opacity=0.9,
                symbol=["x" if d == "refer" else "circle" for d in tiles["decision"]],
                line=dict(width=1, color="black"),
                colorbar=dict(title=dict(text="p(IDC)" if task == "idc" else "p(malignant)"))),
    text=[f"x {x}, y {y}: {d} (p {p:.2f})" for x, y, d, p in zip(tiles["x"], tiles["y"], tiles["decision"], prob)],
    hoverinfo="text"))
fig.update_layout(height=650, margin=dict(l=0, r=0, t=10, b=0), dragmode="pan", showlegend=False)
fig.update_xaxes(visible=False)
fig.update_yaxes(visible=False, scaleanchor="x")
st.caption("Scroll to zoom, drag to pan; click a tile's marker to see it at full resolution. Crossed tiles were "
           "referred; the green line is the tissue mask's border.")
event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="slide_map", config={"scrollZoom": True})

picked = None
points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
    getattr(getattr(event, "selection", None), "points", []) or []
for pt in points:
    if pt.get("curve_number", pt.get("curveNumber")) == 1:
        picked = int(pt.get("point_index", pt.get("pointIndex")))
        break
labels = [f"x {x}, y {y} · {d} · p {p:.2f}" for x, y, d, p in zip(tiles["x"], tiles["y"], tiles["decision"], prob)]
order = list(np.argsort(-prob.fillna(-1).to_numpy()))
choice = st.selectbox("Tile to inspect (highest probability first)", order, format_func=lambda i: labels[i],
                      index=order.index(picked) if picked in order else 0, key="slide_tile_pick")
row = tiles.iloc[int(choice)]
slide, info2 = open_slide(path, mpp)
try:
    _, size = target_scale(task, mag)
    tile_img = read_tile(slide, info2, TileSpec(int(row.x), int(row.y), int(row.width), int(row.height), 1.0), size)
    gallery = [(r, read_tile(slide, info2, TileSpec(int(r.x), int(r.y), int(r.width), int(r.height), 1.0), size))
               for r in top_tiles(run, 6).itertuples(index=False)]
finally:
    slide.close()
st.subheader(f"Tile at x {int(row.x)}, y {int(row.y)} (level-0 pixels)")
headline = (f"Refer to the pathologist: {row.reason}" if row.decision == "refer" else
            f"{row.decision} (p {float(row[run.prob_column]):.2f})")
(st.warning if row.decision == "refer" else st.info)(md_escape(headline))
a, b = st.columns(2)
a.image(tile_img, caption="the field of view as the model saw it", width="stretch")
if row.decision_kind in ("call", "band"):  # no heatmap on tiles refused as not tissue or unlike the training frames
    heat = gradcam_heatmap(lm, tile_img, "Grad-CAM", 1)
    b.image(gradcam_overlay(tile_img, heat, 0.45), caption=f"Grad-CAM for {what}", width="stretch")
else:
    b.info("No heatmap: the tile was refused before any call (" + md_escape(str(row.reason)) + ").")

st.subheader("Highest-probability tiles")
cols = st.columns(3)
for i, (r, im) in enumerate(gallery):
    cols[i % 3].image(im, caption=f"x {int(r.x)}, y {int(r.y)} · {r.decision} · p {float(getattr(r, run.prob_column)):.2f}",
                      width="stretch")

st.subheader("Save the slide to the case history")
with st.form("slide_save"):
    label = st.text_input("Case reference (no patient names)", key="slide_case_label")
    note = st.text_area("Note", key="slide_case_note")
    if st.form_submit_button("Save slide summary"):
        try:
            cid = save_slide_case(history_store(), run, label or "slide", note)
            st.success(f"Saved as case {cid}: open it on the History page.")
        except Exception as exc:  # a database problem: said, the analysis above is kept
            st.error(f"The slide could not be saved ({type(exc).__name__}: {exc}); the results above are unchanged.")
