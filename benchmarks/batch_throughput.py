"""Throughput of `python -m models batch` on local Ray with 1 and 2 Predictor replicas against the plain predict CLI,
in one run (issue 29). Frames/s and ratios, not timed assertions (these machines are noisy); Ray's start-up cost is
reported apart from scoring.

    python benchmarks/batch_throughput.py [--frames 160] [--out benchmarks/results/batch_throughput.json]

The frames are the first N of ../shared/data/breakhis/manifest.csv (all magnifications, as an archive would mix them).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pandas as pd  # noqa: E402

from models.config import data_dir, software_version  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch_throughput.json")
    args = ap.parse_args()
    data = data_dir()
    frames = pd.read_csv(data / "manifest.csv").head(args.frames)
    frames["path"] = [str(data / p) for p in frames["path"]]
    res: dict = {"frames": len(frames), "cpus": os.cpu_count(), "software": software_version(),
                 "by_magnification": frames["magnification"].value_counts().to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        frames[["path", "magnification"]].to_csv(manifest, index=False)
        # the plain CLI: one process per magnification (it takes one --magnification), model load included
        t = time.perf_counter()
        n = 0
        for mag, grp in frames.groupby("magnification"):
            r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", mag, "--no-subtype",
                                *grp["path"]], capture_output=True, text=True, cwd=ROOT, check=True)
            n += sum(1 for _ in csv.DictReader(io.StringIO(r.stdout)))
        cli_s = time.perf_counter() - t
        res["predict_cli"] = {"seconds": cli_s, "frames_per_s": n / cli_s}
        from models.batch import run_batch

        for workers in (1, 2):
            t = time.perf_counter()
            st = run_batch(manifest, Path(tmp) / f"out{workers}.parquet", workers=workers, batch_size=16,
                           progress=False)
            wall = time.perf_counter() - t
            res[f"batch_{workers}_workers"] = {
                "wall_s": wall, "ray_start_s": st["ray_start_s"], "score_s": st["score_s"],
                "frames_per_s_scoring": st["scored"] / st["score_s"], "frames_per_s_wall": st["scored"] / wall}
    c = res["predict_cli"]["frames_per_s"]
    res["ratios"] = {f"batch_{w}w_wall_over_cli": res[f"batch_{w}_workers"]["frames_per_s_wall"] / c for w in (1, 2)}
    res["ratios"]["batch_2w_over_1w_scoring"] = (res["batch_2_workers"]["frames_per_s_scoring"]
                                                 / res["batch_1_workers"]["frames_per_s_scoring"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{len(frames)} frames on {os.cpu_count()} CPUs: predict CLI {c:.1f} frames/s; "
          + "; ".join(f"batch {w} worker(s) {res[f'batch_{w}_workers']['frames_per_s_wall']:.1f} frames/s wall "
                      f"({res[f'batch_{w}_workers']['frames_per_s_scoring']:.1f} scoring, Ray start "
                      f"{res[f'batch_{w}_workers']['ray_start_s']:.1f} s)" for w in (1, 2))
          + f"; 2 vs 1 worker scoring ratio {res['ratios']['batch_2w_over_1w_scoring']:.2f}")


if __name__ == "__main__":
    main()
