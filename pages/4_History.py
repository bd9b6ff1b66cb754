"""History: saved cases with their audit trail; reopen one, export its report (HTML) or its frames (CSV)."""
import io

import pandas as pd
import streamlit as st
from PIL import Image

from app.dashboard import DISCLAIMER, png_data_url, readable_png
from app.history import (AuditError, add_event, case_csv, case_events_frame, case_frames, case_report_html, case_state,
                         list_cases, read_only_note, user_from_headers)
from models.textsafe import md_escape
from app.report_pdf import PdfUnavailable, case_report_pdf
from app.ui_cache import cached_reliability_or_none, history_store
from app.viewer import VIEWER_CAPTION, frame_viewer
from models.slide import MAG_MPP
from models.uncertainty import short_uncertainty

st.set_page_config(page_title="History", page_icon="🗂️", layout="wide")
st.title("Case history")
st.warning(DISCLAIMER)
try:
    store = history_store()
except Exception as exc:  # a bad URL or an unreachable server: a message, not a traceback
    st.error(f"The history database cannot be opened ({type(exc).__name__}: {exc}). Set BREAKHIS_HISTORY_URL or "
             "BREAKHIS_HISTORY_DB.")
    st.stop()
if read_only_note(store):
    st.info(read_only_note(store))
c1, c2 = st.columns(2)
verdict = c1.selectbox("Case verdict", ["any", "malignant", "benign", "refer"], key="hist_verdict")
search = c2.text_input("Search case reference or note", key="hist_search")
df = list_cases(store, None if verdict == "any" else verdict, search)
if df.empty:
    filtered = verdict != "any" or bool(search)
    st.info("No case matches these filters." if filtered and not list_cases(store).empty else
            "No saved cases yet: analyse frames on Diagnose and press 'Save case'.")
    st.stop()
st.dataframe(df[["id", "created_at", "label", "magnification", "verdict", "mean_p", "n_frames", "n_referred",
                 "pathologist_call", "pathologist_note"]], hide_index=True, width="stretch")
cid = st.selectbox("Open case", df["id"].tolist(), format_func=lambda i: f"{i}: {df.set_index('id').loc[i, 'label']}",
                   key="hist_case")
case = df.set_index("id").loc[cid]
state = case_state(store, int(cid))
fr = case_frames(store, int(cid))
st.subheader(f"Case {cid}")
# the review leads with the verdict and its reason, then the pathologist's call and note; ids and hashes come last
lead = f"Case verdict: {case['verdict']}. {str(case['verdict_reason'])[:1].upper()}{str(case['verdict_reason'])[1:]}."
(st.warning if case["verdict"] == "refer" else st.info)(md_escape(lead))
status = ("withdrawn" if state["withdrawn"] else f"signed off by {state['signed_off_by']}" if state["signed_off_by"]
          else "open (not signed off)")
st.markdown(f"**Pathologist's call:** {md_escape(state['call'] or 'not recorded')} · **status:** {md_escape(status)}")
if state["note"]:
    st.text(f"Note: {state['note']}")
gallery = st.columns(4)
for i, rec in enumerate(fr.to_dict("records")):
    col = gallery[i % 4]
    caption = (f"{rec['file_name']} · {rec['decision']}"
               + ("" if rec["p_malignant"] is None or rec["p_malignant"] != rec["p_malignant"]
                  else f" · p {rec['p_malignant']:.2f}"))
    png = readable_png(rec["heatmap_png"]) or readable_png(rec["thumbnail_png"])
    if png:
        col.image(png, width="stretch", caption=caption)
    else:
        col.text(caption + " (no image stored)")
# a closer look: the saved frame at full resolution and its overlay, zooming and panning together
look = st.selectbox("Look closer at frame", range(len(fr)), format_func=lambda i: str(fr["file_name"].iloc[i]),
                    key="hist_look")
rec = fr.iloc[look]
full = readable_png(rec.get("frame_png"))
shown = full or readable_png(rec["thumbnail_png"])  # an older case: its thumbnail
original = Image.open(io.BytesIO(shown)) if shown else None
if original is None:
    st.text("No image of this frame was stored.")
else:
    ov = readable_png(rec.get("overlay_jpeg"))
    panels = [(f"{rec['heatmap_method'] or 'heatmap'}, class malignant", Image.open(io.BytesIO(ov)))] if ov else []
    # a stored image covers one frame's field (700 px wide at the magnification's nominal µm/px), whatever its own
    # width: a full frame, a slide tile at the model's input size or an old case's thumbnail
    mpp = MAG_MPP.get(str(rec["magnification"]))
    st.plotly_chart(frame_viewer(original, panels, um_per_px=round(mpp * 700 / original.width, 3) if mpp else None),
                    width="stretch", key="hist_viewer")
    firm = short_uncertainty(rec["p_malignant"], cached_reliability_or_none(str(rec["model_id"])))
    st.caption((f"{rec['decision']}, p {rec['p_malignant']:.3f}" if rec["p_malignant"] == rec["p_malignant"] and
                rec["p_malignant"] is not None else str(rec["decision"]))
               + (f" ({firm})" if firm else "") + ". "
               + ("" if full else "Saved before full-resolution frames were kept: this is the stored thumbnail. ")
               + ("" if ov else "No heatmap was stored for this frame (refused before any call, or saved without one). ")
               + VIEWER_CAPTION)
ev = case_events_frame(store, int(cid))
st.markdown("**Audit trail** (append-only)")
st.dataframe(ev[["at", "app_user", "kind", "pathologist_call", "note", "reason"]], hide_index=True, width="stretch")

user = user_from_headers(getattr(st.context, "headers", None))
if user:
    st.caption(f"Signed in as {md_escape(user)} (from the login proxy).")
else:
    user = st.text_input("Your name (recorded with every action)", key="user_name")
if not state["withdrawn"]:
    with st.form("case_action"):
        action = st.radio("Action", ["sign off", "amend", "withdraw"], horizontal=True, key="hist_action")
        new_call = st.selectbox("Amended call", ["", "benign", "malignant", "uncertain"], key="hist_new_call")
        new_note = st.text_area("Amended note", key="hist_new_note")
        reason = st.text_input("Reason (required to amend or withdraw)", key="hist_reason")
        if st.form_submit_button("Record action"):
            kind = {"sign off": "signed_off", "amend": "amended", "withdraw": "withdrawn"}[action]
            try:
                add_event(store, int(cid), kind, user, reason, call=(new_call or None) if kind == "amended" else None,
                          note=(new_note or None) if kind == "amended" else None)
                st.success(f"Recorded: {action} by {user}.")
                st.rerun()
            except AuditError as exc:
                st.error(str(exc))
with st.expander("Frames with ids, hashes and provenance"):
    show = fr.assign(frame=fr["thumbnail_png"].map(png_data_url), heatmap=fr["heatmap_png"].map(png_data_url))
    show = show.drop(columns=["thumbnail_png", "heatmap_png", "frame_png", "overlay_jpeg"]).rename(
        columns={"p_malignant": "p(malignant)"})
    st.dataframe(pd.DataFrame(show), hide_index=True, width="stretch", row_height=70,
                 column_config={"frame": st.column_config.ImageColumn("frame"),
                                "heatmap": st.column_config.ImageColumn("heatmap (class malignant)")},
                 column_order=["frame", "heatmap", *[c for c in show.columns if c not in ("frame", "heatmap")]])
a, b, c = st.columns(3)
a.download_button("Export report (HTML)", case_report_html(store, int(cid), DISCLAIMER), f"case_{cid}.html", "text/html")
try:
    b.download_button("Export report (PDF)", case_report_pdf(store, int(cid), DISCLAIMER), f"case_{cid}.pdf",
                      "application/pdf")
except PdfUnavailable as exc:
    b.caption(f"No PDF: {exc}.")
c.download_button("Export frames (CSV)", case_csv(store, int(cid)), f"case_{cid}.csv", "text/csv")
