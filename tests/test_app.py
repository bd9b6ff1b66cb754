"""Each page under streamlit.testing's AppTest: widgets, routing per magnification, bad input, metrics."""
import io

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def tiny_root(tiny_models_root, monkeypatch, tmp_path):
    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(tiny_models_root))
    monkeypatch.setenv("BREAKHIS_HISTORY_DB", str(tmp_path / "history.db"))  # never the user's own history
    monkeypatch.chdir(ROOT)
    return tiny_models_root


def _app(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _png(img: Image.Image, fmt="PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def _he_frame(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array([180, 90, 160], np.float32) + rng.normal(0, 30, (460, 700, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _viewer_figures(at) -> list[dict]:
    """The Plotly figures the page drew (the zoomable frame viewer is one)."""
    import json

    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _viewer_images(at) -> int:
    """Image panels in the page's viewer figures (0 when none)."""
    return sum(sum(t.get("type") == "image" for t in f["data"]) for f in _viewer_figures(at)
               if any(t.get("type") == "image" for t in f["data"]))


def _viewer_has_colour_bar(at) -> bool:
    return any(t.get("type") == "heatmap" and t.get("showscale") for f in _viewer_figures(at) for t in f["data"])


def _texts(at) -> str:
    return " ".join(str(x.value) for kind in ("markdown", "warning", "error", "info", "caption", "success", "code")
                    for x in getattr(at, kind))


def test_entry_point_lists_home_first_and_every_page():
    """streamlit_app.py is the page list: Home is its default page (named Home in the sidebar), each page reachable."""
    at = _app("streamlit_app.py")
    assert at.title[0].value == "Breast histopathology research dashboard"
    src = (ROOT / "streamlit_app.py").read_text()
    assert '"pages/0_Home.py", "Home"' in src
    for page, title in [("pages/1_Diagnose.py", "Diagnose"), ("pages/2_Model_metrics.py", "Model metrics"),
                        ("pages/3_Compare_models.py", "Compare models"), ("pages/4_History.py", "History")]:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert title.split()[0].lower() in at.title[0].value.lower(), (page, at.title[0].value)


def test_home_lists_inventory_and_disclaimer():
    at = _app("pages/0_Home.py")
    assert "not a diagnosis" in _texts(at)
    inv = at.dataframe[0].value
    assert list(inv["magnification"]) == ["40X", "100X", "200X", "400X"]
    assert inv.set_index("magnification").loc["100X", "model"] == "100X/efficientnet_lite2"
    assert "python -m training train" in inv.set_index("magnification").loc["400X", "model"]


def test_diagnose_routes_each_magnification():
    at = _app("pages/1_Diagnose.py")
    assert at.radio(key="magnification").value == "100X"
    assert "100X/efficientnet_lite2" in _texts(at)
    assert at.selectbox(key="cam_method").options == ["Grad-CAM", "Grad-CAM++", "EigenCAM", "LayerCAM"]
    assert at.slider(key="opacity").value == 0.45
    at.radio(key="magnification").set_value("200X").run()
    assert "all/resnet50" in _texts(at) and "pooled model" in _texts(at)
    at.radio(key="magnification").set_value("400X").run()
    assert not at.exception
    assert "No model serves 400X" in _texts(at) and "python -m training train" in _texts(at)


def test_diagnose_bad_files_do_not_stop_the_batch():
    at = _app("pages/1_Diagnose.py")
    grey = Image.fromarray(np.random.default_rng(2).integers(0, 255, (460, 700), np.uint8), "L")
    at.file_uploader(key="uploads").set_value([
        ("good.png", _png(_he_frame()), "image/png"),
        ("broken.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"),
        ("notes.jpg", b"this is text", "image/jpeg"),
        ("grey.png", _png(grey), "image/png"),
        ("tiny.png", _png(Image.new("RGB", (10, 10))), "image/png"),
        ("green.png", _png(Image.new("RGB", (700, 460), (30, 160, 40))), "image/png"),
        ("bomb.png", _png(Image.new("1", (9000, 9000))), "image/png"),
        ("deep.tif", _png(Image.fromarray((np.arange(460 * 700).reshape(460, 700) % 65535).astype(np.uint16)), "TIFF"), "image/tiff"),
        ("cmyk.jpg", _png(_he_frame(5).convert("CMYK"), "JPEG"), "image/jpeg"),
        ("rgba.png", _png(_he_frame(6).convert("RGBA")), "image/png"),
        ("palette.png", _png(_he_frame(7).convert("P")), "image/png"),
    ]).run()
    assert not at.exception, at.exception
    text = _texts(at) + " " + " ".join(str(t.value) for t in at.text)
    assert "broken.png" in text and "notes.jpg: not a readable image" in text and "too small" in text
    assert "too large" in text  # bomb.png: refused, listed apart
    assert any("4 of 11 file(s) could not be analysed" in str(e.value) for e in at.error)
    table = at.dataframe[0].value  # the analysed frames only: refusals are not referrals
    assert list(table["file"]) == ["good.png", "grey.png", "green.png", "deep.tif", "cmyk.jpg", "rgba.png", "palette.png"]
    assert table["p_malignant"].notna().all()
    assert "16-bit" in table.set_index("file").loc["deep.tif", "warnings"]
    assert "grayscale" in table.set_index("file").loc["grey.png", "warnings"]
    assert "H&E" in table.set_index("file").loc["green.png", "warnings"]
    good = table.set_index("file").loc["good.png"]
    refused_before_a_call = good["decision"] == "refer" and not str(good["reason"]).startswith("uncertain")
    # the viewer: original + heatmap (with its colour bar); a frame refused before any call gets no heatmap at all
    assert _viewer_images(at) == (1 if refused_before_a_call else 2)
    assert _viewer_has_colour_bar(at) == (not refused_before_a_call)
    assert refused_before_a_call or any(b.label.startswith("Download overlay") for b in at.get("download_button"))


def test_metrics_page_renders_every_model_and_magnification(tiny_root):
    at = _app("pages/2_Model_metrics.py")
    for mag in ["all", "40X", "100X", "200X"]:
        at.selectbox(key="metrics_mag").set_value(mag).run()
        assert not at.exception, (mag, at.exception)
        for mid in at.selectbox(key="metrics_model").options:
            at.selectbox(key="metrics_model").set_value(mid).run()
            assert not at.exception, (mag, mid, at.exception)
            assert "95% CI" in _texts(at)
    at.selectbox(key="metrics_mag").set_value("400X").run()
    assert "No model covers 400X" in _texts(at)


def test_compare_page_runs_models_side_by_side():
    at = _app("pages/3_Compare_models.py")
    assert set(at.multiselect(key="cmp_models").value) == {"100X/efficientnet_lite2", "all/resnet50", "all/hybrid"}
    at.multiselect(key="cmp_models").set_value(["100X/efficientnet_lite2", "all/resnet50"]).run()
    at.file_uploader(key="cmp_upload").set_value(("f.png", _png(_he_frame(3)), "image/png")).run()
    assert not at.exception, at.exception
    assert "agree" in _texts(at) or "refer" in _texts(at)
    calls = at.dataframe[-1].value.set_index("model")
    assert list(calls.index) == ["100X/efficientnet_lite2", "all/resnet50"] and calls["rule"].str.len().gt(0).all()
    called = calls["decision"].ne("refer") | calls["reason"].str.startswith("uncertain")
    # one zoomable figure: the original and each called model's overlay, on matched axes, with one colour bar
    assert _viewer_images(at) == 1 + called.sum() and (_viewer_has_colour_bar(at) == bool(called.any()))
    if called.any():
        fig = _viewer_figures(at)[-1]
        assert {v.get("matches") for k, v in fig["layout"].items()
                if k.startswith("xaxis") and k != "xaxis" and v.get("visible", True)} == {"x"}
    flat = Image.new("RGB", (700, 460), (200, 120, 190))  # not histology: no model may "agree" on it
    at.file_uploader(key="cmp_upload").set_value(("flat.png", _png(flat), "image/png")).run()
    assert not at.exception, at.exception
    assert not at.success and "refer it to the pathologist" in _texts(at)
    assert set(at.dataframe[-1].value["decision"]) == {"refer"}
    assert _viewer_images(at) == 0 and "every model refused this image" in _texts(at)  # no heatmaps on refused images


def test_compare_shows_how_far_each_recipe_moves_under_repeated_cv(tmp_path):
    """Rule 1 on the Compare page: a trained recipe's repeats (split and training seeds) beside the frozen
    references, only where its frames include the magnification."""
    import json

    from app.dashboard import repeats_rows

    summ = {"auc": {"value": 0.67, "ci95": [0.4, 0.85]}, "patient_auc": {"value": 0.7, "ci95": [0.5, 0.9]}}
    v = {"per_fold_auc_mean": 0.67, "per_fold_auc_sd": 0.2, "per_fold_auc_min": 0.2, "per_fold_auc_max": 0.94,
         "pooled_auc_by_seed": [0.64, 0.63, 0.58], "summary": summ, "n_patients": {"benign": 9, "malignant": 19},
         "per_magnification_auc": {"100X": 0.67}}
    res = {"model_id": "100X/resnet50 recipe", "magnification": "100X", "seeds": [0, 1, 2], "runs": ["a"] * 5,
           "folds_with_temperature_fallback": "7/25", "recipe": {**v, "vs_tiles_mean_lr": {"difference": 0.05,
                                                                                              "ci95": [-0.4, 0.26]}},
           "training_seed_spread": {"0": {"train_seeds": [0, 1, 2], "pooled_auc": [0.64, 0.6, 0.7], "sd": 0.05,
                                          "range": 0.1}},
           "references": {"tiles_mean_lr": v}}
    (tmp_path / "repeats_x.json").write_text(json.dumps(res))
    t = repeats_rows("100X", tmp_path)
    assert list(t["recipe"]) == ["100X/resnet50 recipe", "tiles_mean_lr (frozen Lite2, reference)"]
    assert "training seeds 0, 1, 2 on split seed 0" in t.loc[0, "runs"] and t.loc[0, "frames"] == "100X only"
    assert t.loc[0, "Δ AUC vs frozen mean-tile LR (95% CI)"].startswith("+0.050 (-0.400")
    assert repeats_rows("40X", tmp_path).empty  # 100X-only frames say nothing about 40X
    at = _app("pages/3_Compare_models.py")  # the shipped results: the routed recipe's repeats are shown
    assert any("seed-averaged AUC (95% CI)" in d.value.columns for d in at.dataframe)


def test_compare_agreement_counts_calls_only():
    from app.dashboard import FrameResult, compare_agreement

    def r(mid, decision, ood=False):
        return FrameResult(name="f.png", task="malignancy", model_id=mid, probability=0.9, label="malignant",
                           decision=decision, out_of_distribution=ood)

    assert compare_agreement([r("a", "malignant"), r("b", "malignant")])[0] == "success"
    kind, text = compare_agreement([r("a", "malignant"), r("b", "refer")])
    assert kind == "warning" and "1 of 2 models refer" in text
    assert "disagree" in compare_agreement([r("a", "malignant"), r("b", "benign")])[1]
    assert "does not look like H&E" in compare_agreement([r("a", "malignant", True), r("b", "malignant", True)])[1]


def test_compare_offers_hybrid_branches_and_tta_column():
    at = _app("pages/3_Compare_models.py")
    table = at.dataframe[0].value.set_index("model")
    assert table.loc["all/hybrid", "architecture"] == "hybrid"
    assert "not measured" in table.loc["all/resnet50", "auc with TTA"]
    at.multiselect(key="cmp_models").set_value(["all/hybrid", "100X/efficientnet_lite2"]).run()
    for branch in ("vit", "combined"):
        at.selectbox(key="cmp_branch").set_value(branch).run()
        at.file_uploader(key="cmp_upload").set_value(("f.png", _png(_he_frame(4)), "image/png")).run()
        assert not at.exception, (branch, at.exception)
        maps = at.dataframe[-1].value.set_index("model")["heatmap"]
        assert "ViT branch" in maps["all/hybrid"] or "CNN + ViT" in maps["all/hybrid"] or "refused" in maps["all/hybrid"]
        # the single-branch model falls back to its CNN map
        assert "CNN branch" in maps["100X/efficientnet_lite2"] or "refused" in maps["100X/efficientnet_lite2"]


def test_diagnose_tta_toggle_predicts_with_eight_views():
    at = _app("pages/1_Diagnose.py")
    assert at.toggle(key="tta").value is False
    at.file_uploader(key="uploads").set_value([("a.png", _png(_he_frame(8)), "image/png")]).run()
    def reason() -> str:  # "Reason: p(malignant) = 0.xxx, ..." under the headline decision
        return next(str(m.value) for m in at.markdown if str(m.value).startswith("Reason: p(malignant) = "))

    plain = reason()
    at.toggle(key="tta").set_value(True).run()
    assert not at.exception, at.exception
    assert reason() != plain  # the 8-view mean differs from the single view


def test_diagnose_batch_heatmap_for_a_later_frame():
    """Choosing frame 2 of a batch shows its heatmap (this crashed with a duplicate widget id)."""
    at = _app("pages/1_Diagnose.py")
    at.file_uploader(key="uploads").set_value([("a.png", _png(_he_frame(8)), "image/png"),
                                               ("b.png", _png(_he_frame(9)), "image/png")]).run()
    assert not at.exception, at.exception
    at.selectbox(key="heatmap_pick").set_value(1).run()
    assert not at.exception, at.exception
    assert any(str(h.value) == "b.png" for h in at.subheader)


def test_pages_say_when_a_card_or_the_routing_file_is_refused(tmp_path, monkeypatch, tiny_root):
    """A tampered card is hidden with its one-line reason; a corrupt defaults.json is an error on the page, not a
    traceback, and nothing is served from it."""
    import json
    import shutil

    root = tmp_path / "models"
    shutil.copytree(tiny_root, root)
    card = next(root.glob("*/*/card.json"))
    d = json.loads(card.read_text())
    d["temperature"] = -2.0
    card.write_text(json.dumps(d))
    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(root))
    at = _app("pages/0_Home.py")
    assert "card failed validation" in _texts(at) and "temperature" in _texts(at)
    (root / "defaults.json").write_text("{broken")
    at = _app("pages/0_Home.py")
    assert "Routing is unavailable" in _texts(at) and "not valid JSON" in _texts(at)
    at = _app("pages/1_Diagnose.py")
    assert "Routing is unavailable" in _texts(at)


def test_diagnose_refers_a_non_histology_frame_and_exports_provenance():
    at = _app("pages/1_Diagnose.py")
    flat = Image.new("RGB", (700, 460), (200, 120, 190))
    at.file_uploader(key="uploads").set_value([("flat.png", _png(flat), "image/png"),
                                               ("tissue.png", _png(_he_frame(2)), "image/png")]).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value.set_index("file")
    assert table.loc["flat.png", "decision"] == "refer" and table.loc["flat.png", "reason"]
    assert "referred" in _texts(at) and "Case: refer" in _texts(at)  # one tissue frame called: no case CI
    at.selectbox(key="heatmap_pick").set_value(0).run()
    assert "Refer to the pathologist" in _texts(at)
    assert "How firm is this p?" in _texts(at)  # every frame's p comes with its uncertainty
    assert not any(m.label.startswith("Prediction") for m in at.metric)  # a referred frame gets no verdict type
    assert "How good is this model" in _texts(at)
    from app.dashboard import export_provenance, results_frame  # noqa: F401  (the CSV the page offers)
    csv_button = [b for b in at.get("download_button") if b.label.startswith("Download results")]
    assert csv_button


def test_a_case_saved_on_diagnose_is_found_on_history():
    at = _app("pages/1_Diagnose.py")
    at.file_uploader(key="uploads").set_value([(f"f{i}.png", _png(_he_frame(10 + i)), "image/png")
                                               for i in range(3)]).run()
    at.text_input(key="case_label").set_value("LAB-42")
    at.selectbox(key="case_call").set_value("benign")
    [b for b in at.get("form_submit_button") if "Save case" in str(b.label)][0].click().run()
    assert not at.exception, at.exception
    assert "Saved as case" in _texts(at)
    h = _app("pages/4_History.py")
    table = h.dataframe[0].value
    assert list(table["label"]) == ["LAB-42"] and list(table["pathologist_call"]) == ["benign"]
    assert list(h.dataframe[1].value["kind"]) == ["created"]  # the audit trail
    frames = h.dataframe[2].value
    assert len(frames) == 3  # the case's frames, each with its hashes and decision
    called = (frames["decision"] != "refer") | frames["reason"].str.startswith("uncertain")
    # each frame's heatmap was stored, except on frames refused before any call (no heatmap is drawn there)
    assert (frames["heatmap"].fillna("").str.startswith("data:image/png;base64,") == called).all()
    labels = [b.label for b in h.get("download_button")]
    assert "Export report (HTML)" in labels and "Export frames (CSV)" in labels


def test_history_page_with_no_cases_says_how_to_save_one():
    at = _app("pages/4_History.py")
    assert "No saved cases yet" in _texts(at) and "not a diagnosis" in _texts(at)


def _idc_patch(x, y, cls, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array([190, 110, 170]) + rng.normal(0, 25, (50, 50, 3)), 0, 255).astype(np.uint8)
    return (f"9001_idx5_x{x}_y{y}_class{cls}.png", _png(Image.fromarray(arr)))


def test_idc_page_patches_zip_region_burden_and_gradcam():
    import zipfile

    at = _app("pages/5_IDC_patches.py")
    assert "No IDC patch model" not in _texts(at) and "idc/efficientnet_lite2_idc" in _texts(at)
    patches = [_idc_patch(50 * i, 50 * j, int(i > 1), seed=i * 3 + j) for i in range(3) for j in range(3)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in patches[:6]:
            z.writestr(f"9001/{name[-10]}/{name}", data)
        z.writestr("9001/readme.txt", "not an image")
    at.file_uploader(key="idc_uploads").set_value([("9001.zip", buf.getvalue(), "application/zip"),
                                                   *[(n, d, "image/png") for n, d in patches[6:]],
                                                   ("broken.png", b"\x89PNG not really", "image/png")]).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 10 and table["p_idc"].notna().sum() == 9  # the broken file is a row with its reason
    assert "readme.txt: not an image file" in _texts(at) and "broken.png" in _texts(at)
    assert at.selectbox(key="idc_patient").value == "9001"
    burden = [m for m in at.metric if m.label.startswith("IDC burden")]
    assert burden and "95% CI" in burden[0].value
    assert "names state 33%" in _texts(at)  # 3 of the 9 patches are class 1 in their names
    at.selectbox(key="idc_pick").set_value(4).run()
    assert not at.exception, at.exception
    assert any("Grad-CAM for IDC-positive" in str(c.value) for c in at.caption)


def test_idc_page_without_a_model_says_how_to_train_one(tiny_root, tmp_path, monkeypatch):
    import shutil

    from models.routing.rule import select_defaults

    root = tmp_path / "models"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("idc"))
    select_defaults(root)
    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(root))
    at = _app("pages/5_IDC_patches.py")
    assert "No IDC patch model" in _texts(at) and "train-idc" in _texts(at)


def test_diagnose_shows_the_subtype_within_the_call_with_its_recall_and_gradcam():
    from models.subtype import BENIGN_SUBTYPES, MALIGNANT_SUBTYPES, subtype_label

    at = _app("pages/1_Diagnose.py")
    at.file_uploader(key="uploads").set_value([("a.png", _png(_he_frame(8)), "image/png")]).run()
    assert not at.exception, at.exception
    assert "Subtype model `subtype/efficientnet_lite2_subtype`" in _texts(at) and "where a guess scores" in _texts(at)
    verdict = next(m for m in at.metric if m.label == "Prediction for this frame")  # the decision in headline type
    assert verdict.value in ("benign", "malignant") and any(str(m.value).startswith("Reason: p(malignant) = ")
                                                             for m in at.markdown)  # its reason, then p
    assert not any(m.label.startswith("Subtype") for m in at.metric)  # never in headline type
    assert any(str(e.label).startswith("Subtype: research only (balanced accuracy") for e in at.expander)
    sub_label = next(str(m.value) for m in at.markdown
                     if str(m.value).startswith("Subtype (within the call above)")).split("**")[1]
    side = MALIGNANT_SUBTYPES if verdict.value == "malignant" else BENIGN_SUBTYPES
    assert sub_label in [subtype_label(s) for s in side]  # the subtype agrees with the verdict beside it
    top3 = at.dataframe[-1].value
    assert len(top3) == 3 and list(top3.columns) == ["subtype", "probability"]
    assert top3["probability"].is_monotonic_decreasing
    assert "(not calibrated). In patient-grouped CV the subtype model recognised" in _texts(at)
    assert not any("for the subtype" in str(c.value) for c in at.caption)  # Grad-CAM only on demand
    at.toggle(key="subtype_cam").set_value(True).run()
    assert at.selectbox(key="subtype_target").value == next(
        i for i, s in enumerate(BENIGN_SUBTYPES + MALIGNANT_SUBTYPES) if subtype_label(s) == sub_label)
    at.selectbox(key="subtype_target").set_value(6).run()
    assert not at.exception, at.exception
    assert any("for the subtype 'mucinous carcinoma'" in str(c.value) for c in at.caption)


def test_diagnose_gives_no_subtype_for_a_referred_frame():
    at = _app("pages/1_Diagnose.py")
    flat = Image.new("RGB", (700, 460), (120, 200, 90))
    at.file_uploader(key="uploads").set_value([("flat.png", _png(flat), "image/png")]).run()
    assert not at.exception, at.exception
    assert "No subtype is shown for a referred frame" in _texts(at)
    assert not any(str(e.label).startswith("Subtype") for e in at.expander)


def test_metrics_page_shows_the_subtype_confusion_matrix_with_patient_counts():
    at = _app("pages/2_Model_metrics.py")
    at.radio(key="metrics_task").set_value("subtype").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="metrics_subtype_model").value == "subtype/efficientnet_lite2_subtype"
    variants = at.dataframe[0].value
    assert "image-wise (LEAKAGE)" in set(variants["split"]) and "hierarchical" in set(variants["variant"])
    counts = at.dataframe[1].value
    assert counts.shape == (8, 8) and counts.index[0] == "adenosis (3 pt)" and int(counts.to_numpy().sum()) == 96
    at.selectbox(key="metrics_subtype_variant").set_value("flat (image-wise split: LEAKAGE)").run()
    assert not at.exception, at.exception
    assert "where a guess scores" in _texts(at)


def test_home_states_how_weak_the_subtype_model_is():
    at = _app("pages/0_Home.py")
    assert "Diagnose also shows a subtype within each call" in _texts(at) and "balanced accuracy" in _texts(at)


def test_history_says_no_case_matches_when_filters_match_nothing(tmp_path, monkeypatch):
    from app.dashboard import FrameResult
    from app.history import open_store, save_case
    from models.case import CaseFrame, case_verdict

    eng = open_store(f"sqlite:///{tmp_path / 'history.db'}")
    r = [FrameResult(name="f.png", task="malignancy", model_id="m", probability=0.9, decision="malignant",
                     decision_kind="call")]
    save_case(eng, "LAB-1", "100X", case_verdict([CaseFrame("f.png", "100X", "m", 0.9, "malignant", kind="call")]), r,
              [b"x"], {})
    at = _app("pages/4_History.py")
    at.text_input(key="hist_search").set_value("%").run()
    assert any("No case matches" in str(i.value) for i in at.info)


def test_diagnose_lists_unreadable_files_apart_and_saves_a_single_frame():
    at = _app("pages/1_Diagnose.py")
    at.file_uploader(key="uploads").set_value([
        ("good.png", _png(_he_frame()), "image/png"),
        ("broken.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"),
    ]).run()
    assert not at.exception, at.exception
    assert any("could not be analysed" in str(e.value) for e in at.error)
    assert not any("Case verdict" in str(h.value) for h in at.subheader)  # one analysed frame: no case section
    table = at.get("download_button")  # the CSV: the broken file is "not analysed", never "refer"
    at.text_input(key="case_label").set_value("ONE-FRAME")
    at.get("form_submit_button")[0].click().run()
    assert not at.exception, at.exception
    assert any("Saved as case" in str(s.value) for s in at.success)
    from app.history import default_url, list_cases, open_store

    cases = list_cases(open_store(default_url()))
    assert cases["label"].tolist() == ["ONE-FRAME"] and int(cases["n_frames"][0]) == 1
    assert table


def test_saving_the_same_frames_twice_asks_first_and_history_signs_off():
    frames = [("a.png", _png(_he_frame(1)), "image/png"), ("b.png", _png(_he_frame(2)), "image/png")]
    at = _app("pages/1_Diagnose.py")
    at.file_uploader(key="uploads").set_value(frames).run()
    at.text_input(key="case_label").set_value("DUP-1")
    at.text_input(key="user_name").set_value("dr.test")
    at.get("form_submit_button")[0].click().run()
    assert any("Saved as case" in str(s.value) for s in at.success)
    at.get("form_submit_button")[0].click().run()  # the same frames again: asked first, nothing saved
    assert any("already saved as case" in str(w.value) for w in at.warning)
    from app.history import default_url, list_cases, open_store

    assert len(list_cases(open_store(default_url()))) == 1
    h = _app("pages/4_History.py")
    assert any("Case verdict:" in str(x.value) for x in [*h.info, *h.warning])  # the review leads with the verdict
    # a closer look: the stored frame at full resolution (700x460, not the thumbnail) in the zoomable viewer
    fig = _viewer_figures(h)[0]
    assert fig["layout"]["xaxis"]["range"] == [0, 700] and _viewer_images(h) in (1, 2)
    assert "stored thumbnail" not in _texts(h)
    h.text_input(key="user_name").set_value("dr.test").run()
    h.get("form_submit_button")[0].click().run()  # default action: sign off
    assert not h.exception, h.exception
    h.run()
    assert any("signed off by dr.test" in str(m.value) for m in h.markdown)
    h.radio(key="hist_action").set_value("amend")
    h.get("form_submit_button")[0].click().run()  # an amendment without a reason is refused, in words
    assert any("needs a reason" in str(e.value) for e in h.error)


def test_home_labels_a_ci_that_includes_chance_and_metrics_opens_on_the_routed_model():
    from app.dashboard import evidence_label
    from models.card import Metric

    assert evidence_label(Metric(0.67, (0.49, 0.85)), {"benign": 20, "malignant": 20}).startswith("no better than chance")
    assert evidence_label(Metric(0.81, (0.55, 0.93)), {"benign": 4, "malignant": 14}) == "few patients"
    assert evidence_label(Metric(0.81, (0.60, 0.93)), {"benign": 12, "malignant": 14}) == "better than chance"
    at = _app("pages/2_Model_metrics.py")
    at.selectbox(key="metrics_mag").set_value("100X").run()
    from models.routing import resolve

    served = resolve("malignancy", "100X").model_id
    assert at.selectbox(key="metrics_model").value == served
    assert any("model in use for 100X" in str(s.value) for s in at.success)


def test_uploads_and_magnification_survive_a_visit_to_another_page_and_a_name_mismatch_is_said():
    at = _app("pages/1_Diagnose.py")
    at.radio(key="magnification").set_value("40X").run()
    at.file_uploader(key="uploads").set_value([("SOB_B_A-14-22549AB-100-001.png", _png(_he_frame(3)), "image/png")]).run()
    assert any("the file name says 100X but 40X was chosen" in str(w.value) for w in at.warning)
    # another page: Streamlit drops this page's widget values; the kept copies bring them back
    state = {k: at.session_state[k] for k in ("kept_magnification", "kept_uploads")}
    back = AppTest.from_file(str(ROOT / "pages" / "1_Diagnose.py"), default_timeout=120)
    for k, v in state.items():
        back.session_state[k] = v
    back.run()
    assert not back.exception, back.exception
    assert back.radio(key="magnification").value == "40X"
    assert any("uploaded earlier in this session" in str(i.value) for i in back.info)
    assert any("Model for **40X**" in str(m.value) for m in back.markdown)


def test_compare_states_each_models_decision_rule():
    from app.dashboard import decision_rule
    from models.inference import load_model_folder

    shipped = load_model_folder(ROOT / "magnif_models" / "all" / "efficientnet_lite2_ensemble")
    assert decision_rule(shipped).startswith("own refer policy: refer when 0.")
    at = _app("pages/3_Compare_models.py")
    at.multiselect(key="cmp_models").set_value(["100X/efficientnet_lite2", "all/resnet50"]).run()
    at.file_uploader(key="cmp_upload").set_value(("f.png", _png(_he_frame(3)), "image/png")).run()
    assert not at.exception, at.exception
    rules = list(at.dataframe[-1].value["rule"])  # each model's rule in the table, beside its call
    assert len(rules) == 2 and all("no refer policy" in r for r in rules)  # the tiny models have none: said plainly
