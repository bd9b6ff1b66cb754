"""Diagnose: upload frames, pick the magnification, read calibrated probabilities with Grad-CAM."""
import io

import streamlit as st

from app.dashboard import (DISCLAIMER, MAX_FILES_PER_UPLOAD, case_evidence_line, case_evidence_rows, case_summary,
                           decode_frame, export_provenance, heatmap_png, performance_line, png_data_url, results_frame, subtype_call_rows,
                           subtype_caveat, subtype_for_frame, subtype_recall_line, subtype_route)
from models.routing import resolve
from models.textsafe import csv_safe, md_escape
from models.card import metric
from models.gradcam import (CAM_BRANCHES, CAM_METHODS, cam_branches, gradcam_overlay, overlay_with_scale, tile_attention,
                            tile_attention_overlay)
from models.inference import MAGNIFICATIONS
from app.history import duplicate_cases, save_case, user_from_headers
from app.dashboard import KeptUpload, full_resolution_images, uncertainty_evidence_line
from app.viewer import VIEWER_CAPTION, frame_viewer
from models.slide import MAG_MPP
from models.uncertainty import band_position, short_uncertainty, uncertainty_line
from app.ui_cache import (cached_analysis, cached_heatmap, cached_model, cached_reliability, cached_subtype,
                          history_store)
from models.subtype import SUBTYPES, subtype_label

st.set_page_config(page_title="Diagnose", page_icon="🔬", layout="wide")
st.title("Diagnose")
st.warning(DISCLAIMER)

# Work survives navigation: the chosen magnification and the uploads are kept in the session (widget values are
# dropped by Streamlit when another page is shown, so they are copied to keys of their own).
mag = st.radio("Magnification of the uploaded frames", MAGNIFICATIONS, horizontal=True, key="magnification",
               index=MAGNIFICATIONS.index(st.session_state.get("kept_magnification", "100X")))
st.session_state["kept_magnification"] = mag
r = resolve("malignancy", mag)
if r.model_id is None:
    for note in r.notes:
        st.error(note)
    st.error(f"No model serves {mag}. Train one with:")
    st.code(r.train_command, language="bash")
    st.stop()
try:
    lm = cached_model(r.model_id)
except Exception as exc:  # integrity failure or missing files: a message, not a traceback
    st.error(f"Model {r.model_id} could not be loaded: {exc}")
    st.stop()
st.markdown(f"Model for **{mag}**: `{r.model_id}` · decision threshold p ≥ {lm.card.threshold:.2f} → malignant "
            f"· calibration: {lm.calibration_note(mag)}")
for note in r.notes:
    st.warning(note)
if lm.card.preprocess.stain:
    st.caption(f"Frames are {lm.card.preprocess.stain['method'].capitalize()} stain-normalised to the training set's "
               "statistics before prediction, as during training.")

c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Heatmap method", list(CAM_METHODS), key="cam_method")
branches = cam_branches(lm)
branch = c1.selectbox("Explain which branch", branches, format_func=CAM_BRANCHES.get, key="cam_branch",
                      disabled=len(branches) == 1)
opacity = c2.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
target_name = c3.radio("Explain the class", ["malignant", "benign"], horizontal=True, key="target_class")
target = 1 if target_name == "malignant" else 0
tta = c4.toggle("Test-time augmentation (8 views)", value=False, key="tta",
                help="Averages the model over the 8 rotations/mirrorings of each frame: about 8x slower. Its measured "
                     "effect on AUC is on the Model metrics page; the calibration was fitted without it.")

files = st.file_uploader("Upload H&E frames (PNG, JPEG, TIFF, BMP, WebP)",
                         type=["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"],
                         accept_multiple_files=True, key="uploads")
if files:
    st.session_state["kept_uploads"] = [KeptUpload(f.name, f.getvalue()) for f in files]
elif st.session_state.get("kept_uploads"):
    files = st.session_state["kept_uploads"]
    k1, k2 = st.columns([4, 1])
    k1.info(f"Showing the {len(files)} frame(s) uploaded earlier in this session.")
    if k2.button("Clear them", key="clear_kept_uploads"):
        st.session_state.pop("kept_uploads")
        st.rerun()
if not files:
    st.info("Upload one or more frames to get predictions.")
    st.stop()

if len(files) > MAX_FILES_PER_UPLOAD:
    st.error(f"{len(files)} files were uploaded; only the first {MAX_FILES_PER_UPLOAD} are analysed. Upload the rest "
             "in another batch.")
    files = files[:MAX_FILES_PER_UPLOAD]
results = []
progress = st.progress(0.0, text="Analysing…") if len(files) > 1 else None
for i, f in enumerate(files):
    results.append(cached_analysis(r.model_id, f.name, f.getvalue(), mag, tta))
    if progress:
        progress.progress((i + 1) / len(files), text=f"Analysed {i + 1}/{len(files)}")
if progress:
    progress.empty()

# Refusals are not referrals: files that could not be analysed are listed apart, never counted as referred frames and
# never saved into a case.
ok = [(x, f) for x, f in zip(results, files) if not x.error]
refused = [x for x in results if x.error]
if refused:
    st.error(f"{len(refused)} of {len(results)} file(s) could not be analysed; they are listed here and nowhere else "
             "(not counted as frames, not saved with the case):")
    st.text("\n".join(x.error for x in refused))
analysed = [x for x, _ in ok]
verdict = None
if analysed:
    verdict, name_notes = case_summary(analysed, mag, lm.card.threshold, lm.case_policy)
table = results_frame(results, lm.card.threshold, export_provenance(lm, mag, tta),
                      verdict if len(analysed) > 1 else None)
for n in (name_notes if analysed else []):  # a file named ...-40-... analysed at another magnification
    st.warning(md_escape(n))
if len(analysed) > 1:
    # The case is the unit of decision: its verdict leads, the frames follow.
    st.subheader("Case verdict (if these frames are one case)")
    text = (f"**Case: {verdict.verdict}**. {verdict.reason[0].upper() + verdict.reason[1:]}. {verdict.n_accepted} of "
            f"{verdict.n_frames} frames count toward the case ({verdict.n_band} of them uncertain on their own), "
            f"{verdict.n_referred} refused")
    (st.warning if verdict.verdict == "refer" else st.info)(
        text + (f", {len(verdict.duplicates)} left out as copies of another frame" if verdict.duplicates else "") + ".")
    if verdict.duplicates:  # file names are data: shown as plain text, never Markdown
        st.text("Same pixels, counted once:\n" + "\n".join(f"  {d['name']}  =  {d['duplicate_of']}"
                                                          for d in verdict.duplicates))
    if verdict.drivers:
        st.text("Frames that drive the case verdict: " + ", ".join(
            f"{d['name']} (p {d['p_malignant']:.2f})" for d in verdict.drivers))
    st.caption(case_evidence_line(lm.policy))
    ev = case_evidence_rows(lm.policy)
    if not ev.empty:
        with st.expander("How often the case policy answers, and how often it is right (held-out patients)"):
            st.dataframe(ev, hide_index=True, width="stretch")
    pm = metric(lm.card.summary_at(mag), "patient_accuracy")
    if pm:
        st.caption(f"For scale: this model's patient-level accuracy at {mag} in cross-validation was {pm.fmt()}.")
if len(analysed) > 1:
    bins = cached_reliability(r.model_id)
    shown = table[[not x.error for x in results]].assign(
        thumbnail=[png_data_url(x.thumbnail) for x in analysed],
        similar=[short_uncertainty(x.p_malignant, bins) for x in analysed])
    n_ref = sum(x.decision == "refer" for x in analysed)
    st.markdown(f"**{len(analysed)} frames analysed**: {sum(x.decision == 'malignant' for x in analysed)} malignant, "
                f"{sum(x.decision == 'benign' for x in analysed)} benign, **{n_ref} referred** on their own.")
    st.dataframe(shown[["thumbnail", "file", "decision", "p_malignant", "similar", "reason", "warnings"]], hide_index=True,
                 column_config={"thumbnail": st.column_config.ImageColumn("frame"),
                                "similar": st.column_config.TextColumn("how often frames scored like it were malignant"),
                                "p_malignant": st.column_config.ProgressColumn("p(malignant)", min_value=0.0, max_value=1.0, format="%.3f")},
                 width="stretch")
st.download_button("Download results (CSV)", csv_safe(table).to_csv(index=False), "predictions.csv", "text/csv")

if analysed:  # a single frame can be saved as a case too
    # one frame: its result leads, so the form waits in a collapsed section; a case of several: the form is open
    save_area = (st.expander("Save this frame as a case to the history", expanded=False) if len(analysed) == 1
                 else st.container())
    with save_area, st.form("save_case", clear_on_submit=False):
        st.markdown("**Save this case to the history** (with every analysed frame's file hash, thumbnail, decision "
                    "and the model's provenance; files that could not be analysed are not saved)")
        label = st.text_input("Case reference (your lab's id; no patient names)", key="case_label")
        call = st.selectbox("Your own call", ["", "benign", "malignant", "uncertain"], key="case_call")
        note = st.text_area("Note", key="case_note")
        user = user_from_headers(getattr(st.context, "headers", None)) or st.text_input(
            "Your name (recorded with the case)", key="user_name")
        again = st.checkbox("Save even if a case with the same frames exists", key="case_save_again")
        if st.form_submit_button("Save case"):
            dups = duplicate_cases(history_store(), [f.getvalue() for _, f in ok])
            if dups and not again:
                st.warning(f"These frames are already saved as case {', '.join(map(str, dups))}. Tick 'Save even if a "
                           "case with the same frames exists' to save a second case, or amend the existing one on "
                           "History.")
                st.stop()
            try:
                heats, fulls, overlays = [], [], []
                with st.spinner(f"Computing each frame's {method} for the case record…"):
                    for x, f in ok:
                        fr_img = decode_frame(f.getvalue(), f.name)
                        hm = (cached_heatmap(r.model_id, f.name, f.getvalue(), method, 1, branch)
                              if x.decision_kind in ("call", "band") else None)  # none on a refused frame
                        heats.append(None if hm is None else heatmap_png(fr_img, hm, opacity, f"{method}, class malignant"))
                        full, ov = full_resolution_images(fr_img, hm, opacity)
                        fulls.append(full)
                        overlays.append(ov)
                cid = save_case(history_store(), label, mag, verdict, analysed, [f.getvalue() for _, f in ok],
                                export_provenance(lm, mag, tta), method, call, note, user=user, heatmaps=heats,
                                full_frames=fulls, overlays=overlays)
                st.success(f"Saved as case {cid}: see the History page.")
            except Exception as exc:  # the database is down or full: say so, lose nothing on screen
                st.error(f"The case could not be saved ({type(exc).__name__}: {exc}); the results above are unchanged.")

if not ok:
    st.stop()
if len(ok) == 1:
    pick, pick_file = ok[0]
else:  # chosen by position, with a key: names may repeat and the widget must be created once per run
    pick, pick_file = ok[st.selectbox("Show the heatmap for", range(len(ok)), format_func=lambda i: ok[i][0].name,
                                      key="heatmap_pick")]
frame = decode_frame(pick_file.getvalue(), pick_file.name)
st.subheader(md_escape(pick.name))  # a file name is data: never Markdown
if pick.decision == "refer":  # never in the large verdict type: the model declines to call this frame
    st.warning(f"**Refer to the pathologist**: {pick.reason}.")
    st.markdown(f"<span style='color:#777'>p(malignant) = {pick.p_malignant:.3f} (shown for reference; not a call)"
                "</span>", unsafe_allow_html=True)
else:
    # the headline is the decision and its reason; the probability comes second
    st.metric("Prediction for this frame", pick.decision,
              help=f"Calibrated by temperature scaling on validation patients; threshold {lm.card.threshold:.2f}")
    band = lm.policy.band if lm.policy is not None else None
    st.markdown(f"Reason: p(malignant) = {pick.p_malignant:.3f}, "
                + (band_position(pick.p_malignant, band) if band else
                   f"{'at or above' if pick.p_malignant >= lm.card.threshold else 'below'} the threshold "
                   f"{lm.card.threshold:.2f} (no referral band is fitted for this model)") + ".")
pol = lm.policy
bins = cached_reliability(r.model_id)
# the band position is already in the reason above (a call) or in the referral's reason; said here only without a band
st.markdown("**How firm is this p?** " + md_escape(uncertainty_line(pick.p_malignant, bins,
                                                                     pol.band if pol is not None else None,
                                                                     with_band_position=pol is None)))
ev_line = uncertainty_evidence_line(r.model_id)
if ev_line:
    st.caption(ev_line)
st.caption(performance_line(lm.card, mag))
if pol is not None:
    st.caption(f"Referral policy: frames with p between {pol.band[0]:.2f} and {pol.band[1]:.2f} are referred; outside "
               f"that band this model was {pol.accepted_accuracy:.0%} accurate on {pol.coverage:.0%} of its out-of-fold "
               f"frames ({pol.n_patients.get('benign', 0)} benign / {pol.n_patients.get('malignant', 0)} malignant "
               "patients). Frames failing quality control or unlike the training frames are referred too.")
else:
    st.warning(f"{lm.policy_note.capitalize()}: only quality-control failures are referred.")
for w in pick.warnings:
    st.warning(w)
um_per_px = MAG_MPP.get(mag)
if pick.decision_kind not in ("call", "band"):
    # no heatmap on an image refused before any call (not tissue, failed quality, unlike the training frames): a
    # heatmap there would draw hot spots on nothing
    st.plotly_chart(frame_viewer(frame, um_per_px=um_per_px), width="stretch", key="viewer_refused")
    st.caption("original (no heatmap: the frame was refused before any call). " + VIEWER_CAPTION)
else:
    with st.spinner(f"Computing {method}…"):
        heat = cached_heatmap(r.model_id, pick_file.name, pick_file.getvalue(), method, target, branch)
    overlay = gradcam_overlay(frame, heat, opacity)
    if lm.card.architecture == "tiles":  # a tile model: where its attention went, and the per-tile maps stitched together
        boxes, weights, tiled_size = tile_attention(lm, frame)
        panels = [("tile attention (weights sum to 1)", tile_attention_overlay(frame, boxes, weights, tiled_size)),
                  (f"{method}, class '{target_name}', per tile, stitched", overlay)]
        note = ("Tile attention: each native-resolution tile's weight in the prediction. The heatmap is computed per "
                "tile and stitched into one map; each tile's map is scaled by its attention relative to the "
                "most-attended tile. ")
    else:
        panels = [(f"{method}, class '{target_name}', {CAM_BRANCHES[branch]}", overlay)]
        note = ""
    st.plotly_chart(frame_viewer(frame, panels, columns=len(panels) + 1, um_per_px=um_per_px), width="stretch",
                    key="viewer")
    st.caption(note + f"heatmap scale: blue = little, red = much contribution to the class '{target_name}' ({method}, "
               f"{r.model_id}; the map is scaled to its own maximum, so compare regions within a frame, not across "
               "frames). " + VIEWER_CAPTION)
    buf = io.BytesIO()
    overlay_with_scale(overlay, f"{method}, class {target_name}, {r.model_id}").save(buf, "PNG")
    st.download_button("Download overlay (PNG)", buf.getvalue(), f"{pick.name.rsplit('.', 1)[0]}_{method}.png", "image/png")

# The subtype is research only: a collapsed section with its balanced accuracy and chance level, never in headline
# type, and absent for a referred frame (there is no benign/malignant call to place it in).
if pick.decision == "refer":
    st.caption("No subtype is shown for a referred frame: there is no benign/malignant call to place it in.")
    st.stop()
sr = subtype_route()
if sr is None:
    st.caption("No subtype model is routed: train one with `python -m training train --task subtype --data "
               "../shared/data/breakhis --out magnif_models/subtype/efficientnet_lite2_subtype` and re-run "
               "`python -m training select-defaults`.")
    st.stop()
k_testable = max(1, len(sr.get("testable_classes") or []))
with st.expander(f"Subtype: research only (balanced accuracy {sr['balanced_accuracy']:.2f} where a guess scores "
                 f"{1 / k_testable:.2f})", expanded=False):
    st.warning(subtype_caveat(sr))
    try:
        slm = cached_model(sr["model_id"])
    except Exception as exc:  # integrity failure or missing files: a message, not a traceback
        st.error(f"Subtype model {sr['model_id']} could not be loaded: {exc}")
        st.stop()
    call = subtype_for_frame(slm, cached_subtype(sr["model_id"], pick_file.name, pick_file.getvalue()),
                             pick.p_malignant, pick.decision)
    if call is None:
        st.info("No subtype for this frame: it was not read or not called.")
        st.stop()
    s1, s2 = st.columns([1, 2])
    s1.markdown(f"Subtype (within the call above): **{subtype_label(call.subtype)}**",
                help="P(subtype) = P(benign or malignant) from the routed model x P(subtype | that call) from the subtype "
                     "model: the subtype always agrees with the verdict above. Not calibrated.")
    s1.caption(f"p = {call.p_subtype:.2f} (not calibrated). " + subtype_recall_line(call))
    s2.dataframe(subtype_call_rows(call), hide_index=True, width="stretch",
                 column_config={"probability": st.column_config.ProgressColumn("probability", min_value=0.0, max_value=1.0,
                                                                                format="%.2f")})
    s2.caption("Top 3 subtypes of the eight. The confusion matrix of the subtype model is on the Model metrics page.")
    if not st.toggle("Explain a subtype (Grad-CAM of the subtype model, per tile and stitched)", value=False,
                     key="subtype_cam"):
        st.stop()
    sub_target = st.selectbox("Subtype to explain", range(len(SUBTYPES)), index=SUBTYPES.index(call.subtype),
                              format_func=lambda i: subtype_label(SUBTYPES[i]), key="subtype_target")
    with st.spinner(f"Computing {method} for {subtype_label(SUBTYPES[sub_target])}…"):
        sub_heat = cached_heatmap(sr["model_id"], pick_file.name, pick_file.getvalue(), method, sub_target, "cnn")
    st.image(gradcam_overlay(frame, sub_heat, opacity), width="stretch")
    st.caption(f"{method} for the subtype '{subtype_label(SUBTYPES[sub_target])}', computed per tile and stitched "
               f"({sr['model_id']}; same colour scale as above)")
