"""Hardening, second pass (issue 28): duplicate frames, formula injection, deep JSON, verified refer policies, the
model root, control characters, Markdown in names, one-line CLI errors. Each test names the fix it guards."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import ROOT

ROUTED = ROOT / "magnif_models" / "all" / "efficientnet_lite2_ensemble"


def _png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal([170, 110, 180], 30, (460, 700, 3)), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


# 1. duplicate frames are one piece of evidence (models.case: content_sha256 / duplicate_of)
def test_a_frame_five_times_gives_the_verdict_of_the_frame_once(tiny_models_root, tmp_path, capsys):
    from models.__main__ import main

    f = tmp_path / "SOB_M_DC-14-1-100-001.png"
    f.write_bytes(_png(1))
    copies = []
    for i in range(4):  # the same pixels under other names, one re-encoded (the file sha256 differs)
        c = tmp_path / f"copy{i}-100-.png"
        if i == 3:
            Image.open(f).save(c, "PNG", compress_level=1)
        else:
            shutil.copy(f, c)
        copies.append(str(c))
    assert main(["case", "--root", str(tiny_models_root), "--magnification", "100X", str(f)]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["case", "--root", str(tiny_models_root), "--magnification", "100X", str(f), *copies]) == 0
    five = json.loads(capsys.readouterr().out)
    assert five["verdict"] == one["verdict"] and five["n_accepted"] == one["n_accepted"] == 1
    assert five["mean_p"] == pytest.approx(one["mean_p"]) and five["ci95"] == pytest.approx(one["ci95"])
    assert sorted(d["name"] for d in five["duplicates"]) == sorted(copies)
    assert "duplicate" in five["reason"]


def test_the_diagnose_case_counts_renamed_copies_once(tiny_models_root):
    from app.dashboard import analyse_uploads, case_summary
    from models.engine import MalignancyPredictor
    from models.inference import load_model_folder

    lm = load_model_folder(tiny_models_root / "100X" / "efficientnet_lite2")
    data = _png(2)
    res = analyse_uploads(MalignancyPredictor(lm, magnification="100X"), [("a.png", data), ("b.png", data),
                                                                         ("c.png", data), ("other.png", _png(3))])
    v, _ = case_summary(res, "100X", lm.card.threshold, None)
    assert v.n_accepted == 2 and [d["duplicate_of"] for d in v.duplicates] == ["a.png", "a.png"]


# 2. CSV exports never carry a formula (models.textsafe.csv_safe; History CSV, Diagnose CSV, predict CLI)
@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_every_formula_start_is_neutralised(start):
    from models.textsafe import csv_cell, csv_safe

    bad = f"{start}HYPERLINK(\"https://example.org\")"
    assert csv_cell(bad) == "'" + bad
    df = csv_safe(pd.DataFrame({"file": [bad], "p": [0.5], "reason": ["ok"]}))
    assert df.loc[0, "file"].startswith("'") and df.loc[0, "p"] == 0.5 and df.loc[0, "reason"] == "ok"


def test_history_csv_and_predict_cli_neutralise_file_names(tmp_path, tiny_models_root):
    from app.dashboard import FrameResult
    from app.history import case_csv, open_store, save_case
    from models.case import CaseVerdict

    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    r = FrameResult(name="=cmd|' /C calc'!A0.png", task="malignancy", model_id="m", probability=0.7,
                    decision="malignant", reason="+1", warnings=("@SUM(1)",))
    v = CaseVerdict("malignant", "r", 0.7, (0.6, 0.8), 1.0, 1, 1, 0)
    cid = save_case(eng, "-label", "100X", v, [r], [b"x"], {})
    text = case_csv(eng, cid)
    rows = pd.read_csv(io.StringIO(text))
    assert rows.loc[0, "file_name"].startswith("'=") and rows.loc[0, "reason"] == "'+1"
    assert rows.loc[0, "warnings"].startswith("'@")
    f = tmp_path / "=2+5.png"
    f.write_bytes(_png(4))
    p = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--root",
                        str(tiny_models_root), "--no-subtype", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0
    assert "\n=" not in p.stdout and ",=" not in p.stdout


# 3. deep JSON is one line, never a RecursionError (CardError / DefaultsError / EvidenceError / PolicyError)
def test_deeply_nested_json_is_refused_in_one_line(tmp_path):
    from models.card import CardError, ModelCard
    from models.routing import DefaultsError, read_defaults

    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "card.json").write_text(deep)
    (tmp_path / "defaults.json").write_text(deep)
    with pytest.raises(CardError) as e:
        ModelCard.from_json(tmp_path / "card.json")
    assert "\n" not in str(e.value)
    with pytest.raises(DefaultsError):
        read_defaults(tmp_path)
    r = subprocess.run([sys.executable, "-m", "models", "check-card", str(tmp_path / "card.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# 4. the refer policy is verified like the weights (models.refer.ReferPolicyFile, ood_sha256, shapes, threshold)
@pytest.mark.parametrize("edit,says", [
    (lambda d: d.update(band=[1.0, 1.0]), "does not contain the model's threshold"),
    (lambda d: d.update(band=["a", "b"]), "refused"),
    (lambda d: d.update(band=[0.7, 0.3]), "refused"),
    (lambda d: d.pop("card_sha256"), "refused"),
    (lambda d: d.update(ood_sha256="0" * 64), "refused"),
])
def test_a_tampered_refer_policy_is_refused_and_said(tmp_path, edit, says):
    from models.inference import load_model_folder

    dst = tmp_path / "all" / "m"
    shutil.copytree(ROUTED, dst)
    d = json.loads((dst / "refer.json").read_text())
    edit(d)
    (dst / "refer.json").write_text(json.dumps(d))
    lm = load_model_folder(dst)
    assert lm.policy is None and says in lm.policy_note and "\n" not in lm.policy_note


def test_an_ood_scorer_of_the_wrong_shape_is_refused(tmp_path):
    from models.archs import file_sha256
    from models.inference import load_model_folder

    dst = tmp_path / "all" / "m"
    shutil.copytree(ROUTED, dst)
    z = dict(np.load(dst / "ood.npz"))
    z["mean"] = z["mean"][:10]
    np.savez(dst / "ood.npz", **z)
    d = json.loads((dst / "refer.json").read_text())
    d["ood_sha256"] = file_sha256(dst / "ood.npz")  # even re-bound, the shapes give it away
    (dst / "refer.json").write_text(json.dumps(d))
    lm = load_model_folder(dst)
    assert lm.policy is None and "inconsistent shapes" in lm.policy_note


# 7. model ids resolve under the root only
def test_a_symlinked_model_leaving_the_root_is_refused_unless_named_explicitly(tmp_path, tiny_models_root):
    from models.engine import ServeError, model_path

    root = tmp_path / "root"
    (root / "100X").mkdir(parents=True)
    os.symlink(tiny_models_root / "100X" / "efficientnet_lite2", root / "100X" / "elsewhere")
    with pytest.raises(ServeError, match="outside the models root"):
        model_path("100X/elsewhere", root)
    assert model_path(str(tiny_models_root / "100X" / "efficientnet_lite2"), root).is_dir()


# 8/10. control characters and bidi overrides are cleaned (and said) before storing
def test_nul_and_bidi_characters_are_cleaned_before_storing(tmp_path):
    from app.dashboard import FrameResult
    from app.history import case_frames, list_cases, open_store, save_case
    from models.case import CaseVerdict

    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    r = FrameResult(name="scan\x00\u202egnp.exe", task="malignancy", model_id="m", probability=0.4, decision="benign")
    v = CaseVerdict("benign", "r", 0.4, (0.3, 0.5), 0.0, 1, 1, 0)
    cid = save_case(eng, "a" * 300, "100X", v, [r], [b"x"], {}, note="n\x00ote")
    fr = case_frames(eng, cid)
    assert "\x00" not in fr.loc[0, "file_name"] and "<U+202E>" in fr.loc[0, "file_name"]
    c = list_cases(eng).iloc[0]
    assert len(c["label"]) == 200 and "stored with changes" in c["pathologist_note"] and "cut from 300" in c["pathologist_note"]


# 9. file names are plain text on the pages
def test_markdown_in_a_file_name_is_escaped():
    from models.textsafe import md_escape

    name = "[x](https://example.org)![t](https://example.org/p.png).jpg"
    out = md_escape(name)
    assert "\\[x\\]\\(https" in out and "!\\[" in out.replace("\\!", "!")
    src = (ROOT / "pages" / "1_Diagnose.py").read_text()
    assert "st.subheader(pick.name)" not in src and "md_escape(pick.name)" in src


# 10. one-line CLI errors: no files, a directory, a FIFO, a permission error
def test_cli_errors_for_odd_paths_are_one_line(tmp_path, tiny_models_root):
    from models.preprocess import ImageError, load_image

    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no files" in r.stderr
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


def test_a_permission_error_is_said_as_such(tmp_path):
    from models.preprocess import ImageError, load_image

    locked = tmp_path / "locked.png"
    locked.write_bytes(_png(5))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: the permission case cannot be made here
        pytest.skip("running as root: permission errors cannot be provoked")
    with pytest.raises(ImageError, match="permission denied"):
        load_image(locked)
