"""Home: what the tool is and is not, the model inventory, where to start (listed first by streamlit_app.py)."""
import streamlit as st

from app.dashboard import (DISCLAIMER, card_problems, case_evidence_line, case_evidence_rows, idc_route, inventory,
                           routed_policies, routing_evidence, subtype_caveat, subtype_route)
from models.routing import resolve
from models.inference import MAGNIFICATIONS

st.set_page_config(page_title="BreakHis research dashboard", page_icon="🔬", layout="wide")
st.title("Breast histopathology research dashboard")
st.warning(DISCLAIMER)
st.markdown(
    "Upload BreakHis-style H&E frames (700×460, 40X–400X), choose the magnification, and read a calibrated "
    "benign/malignant probability from the model that serves that magnification (chosen by a rule that "
    "noise cannot fool: see below), with a Grad-CAM heatmap to judge it by. Every figure shown was measured on patients the model never saw "
    "(patient-grouped cross-validation) and comes from a script in the repository.")

st.subheader("Model inventory")
for problem in card_problems():
    st.error(f"A model is hidden because its card failed validation: {problem}")
inv = inventory()
for note in {n for m in MAGNIFICATIONS for n in resolve("malignancy", m).notes if n.startswith("Routing is unavailable")}:
    st.error(note)
if inv.empty or "AUC (95% CI)" not in inv.columns:
    st.error("No trained models found in magnif_models/. Train one with the command shown in the table.")
st.dataframe(inv, hide_index=True, width="stretch")
few = [r["magnification"] for r in inv.to_dict("records") if r.get("evidence") == "few patients"]
if few:
    st.info("Trained and tested on few patients: " + ", ".join(few) + ". Their confidence intervals are wide.")
chance = [r["magnification"] for r in inv.to_dict("records") if str(r.get("evidence", "")).startswith("no better")]
if chance:
    st.warning("At " + ", ".join(chance) + " the routed model's AUC CI includes 0.5: on patients it never saw it is "
               "not shown to be better than chance there.")
with st.expander("What the routing words mean"):
    st.markdown("- **pooled**: one model trained on frames of every magnification, scored here on one of them.\n"
                "- **borrowed**: a model trained at another magnification, scored on this one's frames.\n"
                "- **incumbent**: the ImageNet-pretrained reference recipe, which serves unless a challenger beats it.\n"
                "- **challenger**: any other model; it displaces the incumbent only if its AUC advantage on the same "
                "held-out frames has a 95% CI above zero (paired patient bootstrap).\n"
                "- **no better than chance**: the AUC's 95% CI includes 0.5.\n"
                "- **few patients**: fewer than 20 held-out patients, or fewer than 5 of a class, behind the figure.")

st.subheader("What a verdict is worth: cases and frames")
st.markdown("The case (a patient's frames at one magnification) is the unit of decision. Frames the model is unsure "
            "about still count toward the case; only frames refused by quality control or unlike the training frames "
            "drop out. Figures below come from patients the policy was never fitted on (nested cross-validation).")
for model_id, pol in routed_policies().items():
    st.markdown(f"**{model_id}** ({', '.join(m for m in MAGNIFICATIONS if resolve('malignancy', m).model_id == model_id)})")
    st.caption(case_evidence_line(pol))
    rows = case_evidence_rows(pol)
    if not rows.empty:
        st.dataframe(rows, hide_index=True, width="stretch")

with st.expander("Why each magnification is served by its model (routing rule and evidence)"):
    st.markdown(
        "An ImageNet-pretrained **incumbent** serves unless a **challenger** beats it on the same out-of-fold frames "
        "by an AUC advantage whose paired patient-bootstrap 95% CI lies entirely above zero. With 38 patients, "
        "differences of 0.05-0.1 AUC are noise; this rule keeps noise from choosing the model.")
    for m in MAGNIFICATIONS:
        ev = routing_evidence(m)
        if not ev.empty:
            st.markdown(f"**{m}**")
            st.dataframe(ev, hide_index=True, width="stretch")

st.subheader("Where to start")
st.markdown(
    "- **Diagnose**: upload frames, pick the magnification, read probability, warnings and heatmap.\n"
    "- **Model metrics**: every shipped model's metrics with 95% CIs, curves, calibration and provenance.\n"
    "- **Compare models**: metrics side by side, and all models on the same image.\n"
    "- **History**: saved cases with their audit trail; reopen one, export its report.\n"
    "- **IDC patches**: 50x50 patches of the IDC collection: p(IDC) per patch, the region rebuilt from the patch "
    "coordinates, and the patient's IDC burden.")
idc = idc_route()
if idc:
    st.caption(f"IDC patch model: `{idc['model_id']}`, patch AUC {idc['auc']:.3f} ({idc['auc_ci95'][0]:.3f}–"
               f"{idc['auc_ci95'][1]:.3f}) on {idc['n_patients']} patients it never saw (patient-grouped CV).")
sub = subtype_route()
if sub:
    st.caption("Diagnose also shows a subtype within each call. " + subtype_caveat(sub))
st.caption(f"Magnifications: {', '.join(MAGNIFICATIONS)}. Data: BreakHis (Spanhol et al., IEEE TBME 2016).")
