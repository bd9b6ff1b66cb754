"""Run the adversarial corpus: every kind gets its expected outcome, one clear line, and never a traceback."""
import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.dashboard import analyse_uploads
from models.engine import MalignancyPredictor
from models.card import CardError, ModelCard
from models.inference import ModelIntegrityError, load_model_folder
from models.routing import DefaultsError, read_defaults
from tests.adversarial.corpus import FAULTS, image_cases
from tests.conftest import ROOT

CASES = image_cases()


def test_the_corpus_is_at_least_25_kinds():
    assert len({c.kind for c in CASES}) + len(FAULTS) >= 25 and len({c.kind for c in CASES}) >= 25


@pytest.fixture(scope="module")
def lm(tiny_models_root):
    return load_model_folder(tiny_models_root / "100X" / "efficientnet_lite2")


@pytest.mark.parametrize("case", CASES, ids=[c.filename for c in CASES])
def test_upload_gets_its_expected_outcome(lm, case):
    r = analyse_uploads(MalignancyPredictor(lm, magnification="100X"), [(case.filename, case.data)])[0]
    text = r.error + " " + " ".join(r.warnings)
    if case.outcome == "refused":
        assert r.p_malignant is None and r.error.startswith(case.filename) and "\n" not in r.error, r
    else:
        assert r.error == "" and 0.0 <= r.p_malignant <= 1.0, r
        assert case.outcome != "warned" or r.warnings, r
    assert case.says in text, (case.says, text)
    if case.kind.startswith("non-histology"):
        assert r.out_of_distribution and r.decision == "refer"  # referred, never called
    if case.outcome == "refused":
        assert r.decision == "refer"


def test_predict_cli_gives_every_file_a_row_and_no_traceback(tiny_models_root, tmp_path):
    paths = []
    for c in CASES:
        (tmp_path / c.filename).write_bytes(c.data)
        paths.append(str(tmp_path / c.filename))
    paths.append(str(tmp_path / "does_not_exist.png"))
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X",
                        "--root", str(tiny_models_root), *paths], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["path"] for x in rows] == paths
    for c, row in zip(CASES, rows):
        assert (row["p_malignant"] == "") == (c.outcome == "refused"), (c.kind, row)
        assert c.says in row["warning"], (c.kind, row)
    assert rows[-1]["p_malignant"] == "" and "not found" in rows[-1]["warning"]


def test_diagnose_page_takes_the_whole_corpus_in_one_upload(monkeypatch, tiny_models_root):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(tiny_models_root))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "pages" / "1_Diagnose.py"), default_timeout=300)
    at.run()
    # The uploader's own limits (size, extension list) are Streamlit's: the browser refuses those files itself.
    allowed = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
    small = [c for c in CASES if len(c.data) < 20 * 2**20 and c.filename.endswith(allowed)]
    at.file_uploader(key="uploads").set_value([(c.filename, c.data, "application/octet-stream") for c in small]).run()
    assert not at.exception, at.exception
    # refusals listed apart, as plain text, one line each (issue 27)
    errors = next(str(t.value) for t in at.text if "not a readable image" in str(t.value))
    for c in small:
        assert (c.filename in errors) == (c.outcome == "refused"), c.kind
    assert any("could not be analysed" in str(e.value) for e in at.error)
    table = at.dataframe[0].value  # the analysed frames only: a refused file is never a referred frame
    assert not set(table["file"]) & {c.filename for c in small if c.outcome == "refused"}


# --- faults -------------------------------------------------------------------------------------------------

REFERENCE = ROOT / "magnif_models" / "all" / "efficientnet_lite2_finetuned"


@pytest.mark.parametrize("edit, says", [
    ({"temperature": -1.6}, "temperature"), ({"temperature": 0}, "temperature"), ({"threshold": 0.99}, "threshold"),
    ({"input_size": [20000, 20000]}, "input_size"), ({"surprise": 1}, "unknown field"),
    ({"weights_file": "../../model.safetensors"}, "weights_file"), ({"card_version": 7}, "newer"), (None, "not valid JSON"),
])
def test_tampered_card_is_refused_everywhere(tmp_path, edit, says):
    d = json.loads((REFERENCE / "card.json").read_text())
    folder = tmp_path / "all" / "x"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").symlink_to(REFERENCE / "model.safetensors")
    if edit is None:
        (folder / "card.json").write_text("{not json")
    else:
        if "input_size" in edit:
            d["preprocess"]["input_size"] = edit["input_size"]
        else:
            d.update(edit)
        (folder / "card.json").write_text(json.dumps(d))
    with pytest.raises(CardError, match=says):
        load_model_folder(folder)
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--model", str(folder),
                        "x.png"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and says in r.stderr


def test_flipped_weight_byte_is_refused(tmp_path):
    folder = tmp_path / "all" / "x"
    folder.mkdir(parents=True)
    (folder / "card.json").write_text((REFERENCE / "card.json").read_text())
    w = bytearray((REFERENCE / "model.safetensors").read_bytes())
    w[len(w) // 2] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model_folder(folder)


@pytest.mark.parametrize("text", ["{bad", "[]", '{"100X": {"auc": 0.5, "n_patients": {"benign": 1, "malignant": 1}}}',
                                  '{"100X": {"model_id": "/etc/x", "auc": 0.5, "n_patients": {"benign": 1, "malignant": 1}}}'])
def test_bad_routing_file_is_one_error(tmp_path, text):
    (tmp_path / "defaults.json").write_text(text)
    with pytest.raises(DefaultsError):
        read_defaults(tmp_path)


def _frame_png(seed: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (460, 700, 3), np.uint8)).save(b, "PNG")
    return b.getvalue()


def test_manifest_faults_cost_their_row_only(tmp_path):
    from training.data import index_source

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(_frame_png(0))
    rows = []
    for i in range(4):
        (data / "img" / f"f{i}.png").write_bytes(_frame_png(i))
        rows.append(f"img/f{i}.png,{'benign' if i % 2 else 'malignant'},100X,{i},1{i}A")
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (460, 700, 3), np.uint8)).save(b, "JPEG")
    (data / "img" / "cut.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])  # header verifies, data is cut
    rows += ["img/cut.jpg,benign,100X,9,19A", "../outside.png,benign,100X,7,17A",
             f"{tmp_path / 'outside.png'},benign,100X,8,18A", "img/f0.png,benign,100X,5,ABC"]
    (data / "manifest.csv").write_text("path,label,magnification,patient,slide\n" + "\n".join(rows) + "\n")
    res = index_source(data)
    assert len(res.frame) == 4  # the four good rows, whatever else the manifest holds
    why = dict(res.skipped)
    assert any("outside the data folder" in v for v in why.values()) and len(
        [v for v in why.values() if "outside the data folder" in v]) == 2
    assert any("no numeric stem" in v for v in why.values())
    assert any("cut.jpg" in k and "corrupt or truncated" in v for k, v in why.items())


def test_unsafe_archive_member_is_refused_by_name_and_the_rest_extracted(tmp_path):
    from training.data import index_source

    arc = tmp_path / "BreaKHis_v1.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for name, data in [("BreaKHis_v1/SOB_B_A-14-22549AB-100-001.png", _frame_png(1)),
                           ("BreaKHis_v1/SOB_M_DC-14-2523-100-001.png", _frame_png(2)),
                           ("../evil.png", _frame_png(3))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = index_source(arc, tmp_path / "cache")
    assert len(res.frame) == 2
    assert any("evil.png" in k and "unsafe" in v for k, v in res.skipped)
    assert not (tmp_path / "cache" / "archives" / "evil.png").exists() and not (tmp_path / "evil.png").exists()


def test_corrupt_archive_leaves_nothing_behind(tmp_path):
    from training.data import unpack_archive

    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w:gz") as tf:
        for i in range(3):
            d = _frame_png(i)
            info = tarfile.TarInfo(f"BreaKHis_v1/SOB_B_A-14-22549AB-100-00{i}.png")
            info.size = len(d)
            tf.addfile(info, io.BytesIO(d))
    arc = tmp_path / "BreaKHis_v1.tar.gz"
    arc.write_bytes(good.getvalue()[: len(good.getvalue()) * 2 // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        unpack_archive(arc, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "archives").iterdir())


def test_loading_images_changes_no_process_wide_state():
    """No PIL global or warning filter is touched, even by threads loading bombs and good frames together."""
    import threading
    import warnings

    from models.preprocess import ImageError, load_image

    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    cases = [c for c in CASES if c.filename in ("bomb.png", "huge.png", "good.png", "truncated.jpg")]

    def work():
        for c in cases * 3:
            try:
                load_image(c.data, name=c.filename)
            except ImageError:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


def test_training_cli_errors_are_one_line(tmp_path):
    for args in (["index", "--data", str(tmp_path / "nowhere")], ["select-defaults", "--root", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr, r.stderr
