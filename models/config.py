"""Where things live: every machine path comes from here, overridable by environment variables.

The defaults match the project layout (shipped models beside the code, the shared data and weights in ../shared);
a lab that keeps them elsewhere sets BREAKHIS_MODELS_DIR, BREAKHIS_RESULTS_DIR, BREAKHIS_SHARED, BREAKHIS_DATA or BREAKHIS_LITE2_WEIGHTS.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def models_root() -> Path:
    """Shipped model folders and defaults.json (BREAKHIS_MODELS_DIR)."""
    return Path(os.environ.get("BREAKHIS_MODELS_DIR", REPO_ROOT / "magnif_models"))


def results_dir() -> Path:
    """The measured results the README's tables come from (benchmarks/results; BREAKHIS_RESULTS_DIR)."""
    return Path(os.environ.get("BREAKHIS_RESULTS_DIR", REPO_ROOT / "benchmarks" / "results"))


def shared_dir() -> Path:
    """The shared data and weights, never copied into the repo (BREAKHIS_SHARED)."""
    return Path(os.environ.get("BREAKHIS_SHARED", REPO_ROOT.parent / "shared"))


def data_dir(name: str = "breakhis") -> Path:
    """A dataset folder under the shared data (BREAKHIS_DATA overrides the BreakHis one)."""
    if name == "breakhis" and os.environ.get("BREAKHIS_DATA"):
        return Path(os.environ["BREAKHIS_DATA"])
    return shared_dir() / "data" / name


def lite2_weights() -> Path:
    """The one pretrained backbone available here: EfficientNet-Lite2 ImageNet (BREAKHIS_LITE2_WEIGHTS)."""
    return Path(os.environ.get("BREAKHIS_LITE2_WEIGHTS", shared_dir() / "weights" / "efficientnet_lite2_in1k.safetensors"))


def lite2_init_hint() -> str:
    """The --init argument to suggest in messages, as a path the user can paste."""
    p = lite2_weights()
    try:
        return f"--init {os.path.relpath(p)}"
    except ValueError:  # another drive on Windows
        return f"--init {p}"


_SOFTWARE: list[str] = []


def software_version() -> str:
    """The code's git commit (12 hex + "-dirty" when the tree has changes), or "unknown" outside a git checkout;
    read once per process (exports and batch rows carry it)."""
    if not _SOFTWARE:
        import subprocess

        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
            _SOFTWARE.append((head[:12] + ("-dirty" if dirty else "")) if head else "unknown")
        except (OSError, subprocess.SubprocessError):
            _SOFTWARE.append("unknown")
    return _SOFTWARE[0]
