"""`python -m models batch` on local Ray (issue 29): the same probabilities as `python -m models predict` for every
BreakHis frame in ../shared, a bad file as a row with its reason, and a run killed midway resumed with exactly the
input rows (none lost, none twice). Slow: CI runs it."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, SHARED

pytestmark = pytest.mark.slow
DATA = SHARED / "data" / "breakhis"


def _needs_ray_and_data() -> None:
    if not DATA.is_dir():
        pytest.skip("../shared/data/breakhis is absent")
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (requirements.txt pins ray[data])")


def _ray_pids() -> set[int]:
    """Ray's own processes on this machine (raylet, GCS, workers), to clean up after a run killed with SIGKILL."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"raylet" in cmd or b"gcs_server" in cmd or b"ray::" in cmd or b"default_worker.py" in cmd:
                out.add(int(d.name))
    return out


def _batch(*args: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "models", "batch", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=1200, **kw)
    if r.returncode != 0 and ("Failed to start" in r.stderr or "ray.init" in r.stderr):
        pytest.skip(f"Ray could not start on this machine: {r.stderr.strip().splitlines()[-1]}")
    return r


def test_batch_equals_predict_for_every_frame_and_reports_bad_files(tmp_path):
    _needs_ray_and_data()
    frames = pd.read_csv(DATA / "manifest.csv")
    manifest = tmp_path / "manifest.csv"
    bad = tmp_path / "SOB_B_A-14-22549AB-100-999.png"
    bad.write_text("not an image")
    rows = [{"path": str(DATA / p), "magnification": m} for p, m in zip(frames["path"], frames["magnification"])]
    pd.DataFrame(rows + [{"path": str(bad), "magnification": "100X"}]).to_csv(manifest, index=False)
    out = tmp_path / "results.parquet"
    r = _batch("--input", str(manifest), "--out", str(out), "--workers", "2", "--batch-size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    from models.batch import read_results

    res = read_results(out)
    assert len(res) == len(rows) + 1 and res["path"].is_unique
    b = res.set_index("path").loc[str(bad)]
    assert b["decision_kind"] == "unreadable" and pd.isna(b["p_malignant"]) and b["warning"]
    assert res["card_sha256"].str.len().eq(64).all() and (res["task"] == "malignancy").all()
    for mag, grp in frames.groupby("magnification"):
        files = [str(DATA / p) for p in grp["path"]]
        p = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", mag, "--no-subtype", *files],
                           capture_output=True, text=True, cwd=ROOT, timeout=1200)
        assert p.returncode == 0, p.stderr[-2000:]
        cli = {row["path"]: float(row["p_malignant"]) for row in csv.DictReader(io.StringIO(p.stdout))}
        got = res.set_index("path").loc[files, "p_malignant"]
        assert len(cli) == len(files)
        diff = max(abs(got[f] - cli[f]) for f in files)
        assert diff <= 1e-6, (mag, diff)
        assert list(res.set_index("path").loc[files, "magnification"].unique()) == [mag]


def test_a_run_killed_midway_resumes_with_exactly_the_input_rows(tmp_path):
    _needs_ray_and_data()
    src = tmp_path / "in"
    shutil.copytree(DATA / "40X", src)
    (src / "broken-40-000.png").write_text("truncated")
    n_inputs = len(list(src.iterdir()))
    out = tmp_path / "results.parquet"
    args = [sys.executable, "-m", "models", "batch", "--input", str(src), "--out", str(out), "--magnification", "40X",
            "--batch-size", "4", "--workers", "1"]
    before = _ray_pids()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _ray_pids() - before:  # the local Ray the killed command had started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    from models.batch import done_paths, read_results

    partial = len(done_paths(out))
    assert killed and 0 < partial < n_inputs, (killed, partial, n_inputs)
    r = _batch("--input", str(src), "--out", str(out), "--magnification", "40X", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{partial} already in" in r.stderr
    res = read_results(out)
    assert sorted(res["path"]) == sorted(str(p) for p in src.iterdir())  # every input once: none lost, none twice
    assert (res.loc[res["path"].str.endswith("broken-40-000.png"), "decision_kind"] == "unreadable").all()
    assert not list(out.glob("*.tmp"))
