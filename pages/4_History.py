"""History: saved cases with their audit trail; reopen one, export its report (HTML) or its frames (CSV)."""
import pandas as pd
import streamlit as st

from app.dashboard import DISCLAIMER, png_data_url
from app.history import case_csv, case_frames, case_report_html, list_cases, read_only_note
from app.ui_cache import history_store

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
fr = case_frames(store, int(cid))
st.subheader(f"Case {cid}")
show = fr.assign(frame=fr["thumbnail_png"].map(png_data_url), heatmap=fr["heatmap_png"].map(png_data_url))
show = show.drop(columns=["thumbnail_png", "heatmap_png"]).rename(columns={"p_malignant": "p(malignant)"})
st.dataframe(pd.DataFrame(show), hide_index=True, width="stretch", row_height=70,
             column_config={"frame": st.column_config.ImageColumn("frame"),
                            "heatmap": st.column_config.ImageColumn("heatmap (class malignant)")},
             column_order=["frame", "heatmap", *[c for c in show.columns if c not in ("frame", "heatmap")]])
a, b = st.columns(2)
a.download_button("Export report (HTML)", case_report_html(store, int(cid), DISCLAIMER), f"case_{cid}.html", "text/html")
b.download_button("Export frames (CSV)", case_csv(store, int(cid)), f"case_{cid}.csv", "text/csv")
