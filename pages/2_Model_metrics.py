"""Model metrics: CIs, curves, confusion matrix, calibration, per-patient table, training curves, provenance."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from models.card import ALL, MAGNIFICATIONS, metric
from models.refer import ReferPolicy
from app.dashboard import (DISCLAIMER, cross_magnification_rows, curves, metric_name, metrics_table, model_folder,
                           phases_table, robustness_rows, scan_cards, source_and_worst, subtype_caveat, subtype_confusion,
                           subtype_results_table, subtype_route)
from models.routing import resolve, train_command
from models.metrics import patient_table
from app.ui_cache import cached_baseline_sentence, cached_cards

st.set_page_config(page_title="Model metrics", page_icon="📈", layout="wide")
st.title("Model metrics")
st.caption(DISCLAIMER)
task = st.radio("Task", ["benign / malignant", "subtype"], horizontal=True, key="metrics_task")
if task == "subtype":
    sr = subtype_route()
    scards, problems = scan_cards(None, "subtype")
    for p_ in problems:
        st.error(p_)
    if not scards:
        st.error("No subtype model. Train one with:")
        st.code("python -m training train --task subtype --data ../shared/data/breakhis --out "
                "magnif_models/subtype/efficientnet_lite2_subtype && python -m training select-defaults", language="bash")
        st.stop()
    smid = st.selectbox("Subtype model", list(scards), key="metrics_subtype_model")
    sc = scards[smid]
    ev = sc.evaluation["subtype_cv"]
    if sr:
        st.warning(subtype_caveat(sr))
    st.markdown(f"**{smid}** · {sc.evaluation['strategy']} · init: {sc.init.get('description')} · "
                f"{ev['n_images']} frames, {ev['patients_total']} patients")
    st.caption(ev["protocol"])
    st.dataframe(subtype_results_table(sc), hide_index=True, width="stretch")
    st.caption("Not testable (too few patients; shown, not averaged in): " + (
        "; ".join(f"{k}: {v}" for k, v in ev["not_testable"].items()) or "none"))
    variant = st.selectbox("Confusion matrix of", [k for k, r in ev["results"].items()],
                           index=list(ev["results"]).index(sc.evaluation["strategy"]), key="metrics_subtype_variant")
    counts, share = subtype_confusion(sc, variant)
    fig = go.Figure(go.Heatmap(z=share.to_numpy(), x=list(share.columns), y=list(share.index), colorscale="Blues",
                               zmin=0, zmax=1, text=counts.to_numpy(), texttemplate="%{text}",
                               hovertemplate="true %{y}<br>called %{x}<br>share of the row %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"Out-of-fold confusion matrix ({variant}): frame counts, coloured by share of the true "
                            "subtype's frames", xaxis_title="called subtype", yaxis_title="true subtype (patients)",
                      yaxis_autorange="reversed", height=520)
    st.plotly_chart(fig, width="stretch")
    st.dataframe(counts, width="stretch")
    st.stop()

cards = cached_cards()
# opens at the magnification chosen on Diagnose (kept in the session), so it opens on the model serving it
mag_options = ["all", *MAGNIFICATIONS]
mag = st.selectbox("Magnification", mag_options, key="metrics_mag",
                   index=mag_options.index(st.session_state.get("kept_magnification", "all")))
avail = [mid for mid, c in cards.items() if c.magnification == mag or (c.magnification == ALL and mag in c.per_magnification)]
# (a model trained at another magnification is shown at its own; its cross-magnification check is on its page)
if not avail:
    st.error(f"No model covers {mag}. Train one with:")
    st.code(train_command("malignancy", mag if mag != ALL else "100X"), language="bash")
    st.stop()
if mag != ALL:
    served = resolve("malignancy", mag).model_id
else:  # "all": the model in use at every magnification, where one model serves them all
    in_use = {resolve("malignancy", m).model_id for m in MAGNIFICATIONS}
    served = in_use.pop() if len(in_use) == 1 else None
if served in avail:  # open on the model in use for this magnification, marked
    avail = [served, *[m for m in avail if m != served]]
if st.session_state.get("metrics_mag_shown") != mag:  # a new magnification opens on its model in use
    st.session_state["metrics_mag_shown"] = mag
    st.session_state.pop("metrics_model", None)
mid = st.selectbox("Model", avail, key="metrics_model",
                   format_func=lambda m: f"{m} (in use at {mag})" if m == served else m)
if mid == served:
    st.success(f"{mid} is the model in use for {mag} (magnif_models/defaults.json).")
card = cards[mid]
at = mag if card.magnification == ALL and mag != ALL else None
summary = card.summary_at(at) if at else card.overall
n = summary["n_patients"]
st.markdown(f"**{mid}** · {card.architecture} · init: {card.init.get('description')} · "
            f"{'at ' + at + ' (pooled model)' if at else 'all its data'} · "
            f"test patients: **{n['benign']} benign, {n['malignant']} malignant** · "
            f"images: {summary['n_images']['benign']} benign, {summary['n_images']['malignant']} malignant")
st.caption(card.evaluation.get("protocol", ""))
if n["benign"] + n["malignant"] < 20:
    st.warning("Few patients stand behind these numbers: the confidence intervals are wide.")

mt = metrics_table(card, at).set_index("metric")
cols = st.columns(4)
for i, k in enumerate(["auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1",
                       "patient_accuracy", "patient_score", "patient_auc", "precision", "ece", "brier"]):
    if k in mt.index:
        v = mt.loc[k]
        cols[i % 4].metric(metric_name(k), f"{v.value:.3f}" if v.value == v.value else "n/a",
                           help=f"95% CI {v.ci_low:.3f}–{v.ci_high:.3f} (patient bootstrap)")
        cols[i % 4].caption(f"95% CI {v.ci_low:.3f}–{v.ci_high:.3f}")

cv = curves(model_folder(mid))
cur = cv.get("per_magnification", {}).get(at) if at else cv.get("overall")
base = card.baseline.get("per_magnification", {}).get(at) if at else card.baseline.get("overall")
a, b = st.columns(2)
if cur and "roc" in cur:
    fig = go.Figure()
    fig.add_scatter(x=cur["roc"]["fpr"], y=cur["roc"]["tpr"], name=mid)
    if not at and cv.get("baseline", {}).get("roc"):
        fig.add_scatter(x=cv["baseline"]["roc"]["fpr"], y=cv["baseline"]["roc"]["tpr"], name="frozen-feature baseline",
                        line={"dash": "dot"})
    fig.add_scatter(x=[0, 1], y=[0, 1], name="chance", line={"dash": "dash", "color": "grey"})
    fig.update_layout(title="ROC (out-of-fold)", xaxis_title="1 - specificity", yaxis_title="sensitivity", height=380)
    a.plotly_chart(fig, width="stretch")
    fig = go.Figure(go.Scatter(x=cur["pr"]["recall"], y=cur["pr"]["precision"], name="PR"))
    fig.update_layout(title="Precision-recall", xaxis_title="recall", yaxis_title="precision", height=380)
    b.plotly_chart(fig, width="stretch")
cm = summary["confusion_matrix"]
fig = go.Figure(go.Heatmap(z=[[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], x=["called benign", "called malignant"],
                           y=["benign", "malignant"], text=[[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]],
                           texttemplate="%{text}", colorscale="Purples", showscale=False))
fig.update_layout(title=f"Confusion matrix (out-of-fold frames, threshold {summary.get('threshold', card.threshold):.2f})",
                  xaxis_title="model's call", yaxis_title="true class (patient's diagnosis)", height=340)
a.plotly_chart(fig, width="stretch")
if cur:
    rel = cur["reliability"]
    fig = go.Figure()
    fig.add_scatter(x=rel["mean_predicted"], y=rel["fraction_malignant"], mode="lines+markers", name="model",
                    text=[f"n={c}" for c in rel["count"]])
    fig.add_scatter(x=[0, 1], y=[0, 1], name="perfect calibration", line={"dash": "dash", "color": "grey"})
    fig.update_layout(title=f"Reliability (after temperature scaling, ECE {mt.loc['ece'].value:.3f})",
                      xaxis_title="mean predicted p(malignant)", yaxis_title="observed fraction malignant", height=340)
    b.plotly_chart(fig, width="stretch")

st.subheader("Baseline")
if base:
    bm = metric(base)
    delta = mt.loc["auc"].value - bm.value
    said = cached_baseline_sentence(mid, at)
    st.markdown(f"{card.baseline.get('description', '')}: AUC {bm.value:.3f} (95% CI {bm.ci95[0]:.3f}–{bm.ci95[1]:.3f}). "
                + (said or f"This model {'beats' if delta > 0 else 'does not beat'} it by {delta:+.3f} AUC on the same "
                   "patients (no paired comparison: the folder has no baseline scores per frame)."))

st.subheader("Refer when unsure: risk-coverage")
pol = ReferPolicy.load(model_folder(mid))
if pol is None:
    st.info("No referral policy is fitted for this model (`python -m training fit-refer --model DIR`): only "
            "quality-control failures are referred.")
else:
    rc = pd.DataFrame(pol.risk_coverage)
    fig = go.Figure()
    fig.add_scatter(x=rc["coverage"], y=rc["accuracy"], mode="lines+markers", name="accepted frames",
                    text=[f"band ±{h:.2f}" for h in rc["half_width"]])
    fig.add_scatter(x=[pol.coverage], y=[pol.accepted_accuracy], mode="markers", marker={"size": 14},
                    name=f"chosen band {pol.band[0]:.2f}–{pol.band[1]:.2f}")
    fig.update_layout(title="Accuracy on the frames the model accepts vs the share it accepts (out-of-fold)",
                      xaxis_title="coverage (share of frames not referred)", yaxis_title="accuracy on accepted frames",
                      height=360)
    st.plotly_chart(fig, width="stretch")
    au = pol.ood_audit  # typed, machine keys (models.evidence.OodAudit)
    nan = float("nan")
    rule = {"generated non-histology": au.referred_by_rule.generated, "IDC patches": au.referred_by_rule.idc}
    st.markdown(
        f"Target accuracy {pol.target_accuracy:.0%} on accepted frames: reached {pol.accepted_accuracy:.1%} at "
        f"{pol.coverage:.0%} coverage ({pol.n_frames} out-of-fold frames, {pol.n_patients.get('benign', 0)} benign / "
        f"{pol.n_patients.get('malignant', 0)} malignant patients). Out-of-distribution score AUROC against held-out "
        f"training frames: generated non-histology {au.generated_auroc if au.generated_auroc is not None else nan:.2f}, "
        f"IDC patches (other-scale histology) {au.idc_auroc if au.idc_auroc is not None else nan:.2f}; with the "
        "quality checks, the decision rule referred "
        + ", ".join(f"{k} {v:.0%}" for k, v in rule.items() if v is not None) + ".")
    for n in pol.notes:
        st.caption(n)

st.subheader("Robustness: test-time augmentation, quality control, stain normalisation")
st.dataframe(robustness_rows(card, at), hide_index=True, width="stretch")
st.caption("All on the same out-of-fold predictions. The QC split leaves out frames failing the blur, tissue or "
           "H&E-colour checks of models.quality (thresholds from the training frames' distribution).")
xm = cross_magnification_rows(card)
if len(xm):
    st.markdown(f"**Cross-magnification check** ({card.magnification} model on held-out patients' frames at the other "
                "magnifications):")
    st.dataframe(xm, hide_index=True, width="stretch")
ph = phases_table(card)
if len(ph):
    st.markdown("**Phased fine-tuning** (best validation AUC reached in each phase, per fold):")
    st.dataframe(ph, hide_index=True, width="stretch")

st.subheader("Per patient (out-of-fold)")
pred_path = model_folder(mid) / "predictions.csv"
if pred_path.is_file():
    pr = pd.read_csv(pred_path, dtype={"patient": str}).dropna(subset=["p_malignant"])
    if at:
        pr = pr[pr["magnification"] == at]
    st.dataframe(pd.DataFrame(patient_table(pr["label"], pr["p_malignant"], pr["patient"], card.threshold)),
                 hide_index=True, width="stretch")

    by_source, worst = source_and_worst(pr, card.threshold)
    st.markdown("**By source repository and magnification** (out-of-fold; AUC is n/a where a group has one class):")
    st.dataframe(by_source, hide_index=True, width="stretch")
    st.markdown("**Frames this model gets most wrong** (out-of-fold, largest |truth − p(malignant)|):")
    st.dataframe(worst, hide_index=True, width="stretch")

st.subheader("Training curves")
folds = card.evaluation.get("per_fold") or []
fig = go.Figure()
for f in folds:
    flog = pd.DataFrame(f.get("log") or [])
    if "val_auc" in flog:
        flog["step"] = range(1, len(flog) + 1)
        fig.add_scatter(x=flog["step"], y=flog["val_auc"], name=f"fold {f['fold']} val AUC",
                        text=flog["phase"] + " epoch " + flog["epoch"].astype(str))
if card.training_log:
    log = pd.DataFrame(card.training_log)
    log["step"] = range(1, len(log) + 1)
    for col in ("train_loss", "val_loss", "val_auc"):
        if col in log:
            fig.add_scatter(x=log["step"], y=log[col], name=f"final model {col}", line={"dash": "dot"},
                            text=log["phase"] + " epoch " + log["epoch"].astype(str))
fig.update_layout(title="Training curves: validation AUC per fold (solid) and the final model's loss and AUC (dotted)",
                  xaxis_title="evaluation step (head phase every 5 epochs, then each fine-tuning epoch)",
                  yaxis_title="AUC (val_auc) or loss (train_loss, val_loss)", legend_title_text="curve", height=380)
st.plotly_chart(fig, width="stretch")
if folds:
    st.caption(f"Final model schedule: {card.recipe.get('final_model_schedule', {})}")
    st.dataframe(pd.DataFrame([{k: v for k, v in f.items() if k not in ("log", "phases")} for f in folds]), hide_index=True,
                 width="stretch")

st.subheader("Data provenance and split")
st.json({"data": {k: v for k, v in card.data.items() if k != "skipped"}, "skipped files": len(card.data.get("skipped", [])),
         "split_file": card.split_file, "recipe": card.recipe, "hyperparameters": card.hyperparameters,
         "training_time_s": card.training_time_s, "weights_sha256": card.weights_sha256, "git_commit": card.git_commit,
         "limitations": card.limitations}, expanded=False)
