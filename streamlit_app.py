"""The dashboard's entry point: the page list, with the home page named Home in the sidebar.

`streamlit run streamlit_app.py`. Each page is a thin script in pages/; st.navigation (rather than the pages/
folder's automatic list, which names the entry script "streamlit app") gives every page its own title and URL.
"""
import streamlit as st

PAGES = [("pages/0_Home.py", "Home", "🏠"), ("pages/1_Diagnose.py", "Diagnose", "🔬"),
         ("pages/2_Model_metrics.py", "Model metrics", "📊"), ("pages/3_Compare_models.py", "Compare models", "⚖️"),
         ("pages/4_History.py", "History", "🗂️"), ("pages/5_IDC_patches.py", "IDC patches", "🧫"),
         ("pages/6_Slides.py", "Slides", "🧻")]

st.navigation([st.Page(path, title=title, icon=icon, default=i == 0)
               for i, (path, title, icon) in enumerate(PAGES)]).run()
