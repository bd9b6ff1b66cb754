"""torchrun (issue 29): two CPU processes (gloo) train a tiny network for one epoch with the project's fit(); the
result matches a one-process run with the same seed and global batch.

Stated tolerance: the parameter update (trained minus initial weights) of the 2-process run differs from the
1-process run's by at most 1e-4 of its norm (measured: about 6e-7, float summation order), and validation logits by at
most 1e-5. The tiny network has no BatchNorm or dropout: with BatchNorm on CPU the statistics are per process
(SyncBatchNorm needs a GPU), which is a real difference, not a tolerance (training.distributed says so)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "ddp_tiny_fit.py"


def _run(cmd: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, str(SCRIPT), "--out", str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
          str(SCRIPT), "--out", str(two)], tmp_path)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    num = den = 0.0
    for k, v in a["state"].items():
        assert torch.equal(a["init"][k], b["init"][k])
        da, db = v - a["init"][k], b["state"][k] - b["init"][k]
        num += float(((da - db) ** 2).sum())
        den += float((da ** 2).sum())
    assert den > 0  # it trained
    assert (num / den) ** 0.5 < 1e-4
    assert abs(a["val_logits"] - b["val_logits"]).max() < 1e-5


def test_sharding_helpers_split_a_batch_without_loss():
    from training import distributed

    assert distributed.world() == (0, 1) and distributed.local_share(7) == slice(0, 7)
    assert not distributed.is_distributed()
