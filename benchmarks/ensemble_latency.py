"""Predict-path latency of the seed ensemble against the single run it replaces, in one run (issue 25 item 2).

The Diagnose path per frame: decode + quality checks + preprocess + forward(s) + OOD score + calibration + decision,
and the Grad-CAM heatmap the page draws for the selected frame. Ratios, not absolute times (these machines are noisy).

    python benchmarks/ensemble_latency.py [--single magnif_models/all/efficientnet_lite2_finetuned]
                                          [--ensemble magnif_models/all/efficientnet_lite2_ensemble]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.gradcam import gradcam_heatmap  # noqa: E402
from models.inference import load_model_folder  # noqa: E402
from models.preprocess import load_image  # noqa: E402


def per_frame(lm, frames: list[Path], repeats: int) -> float:
    from models.engine import MalignancyPredictor

    predictor = MalignancyPredictor(lm, magnification="100X")

    def once() -> None:
        for f in frames:  # one at a time, as the Diagnose page analyses an upload
            predictor.predict([str(f)])

    once()
    t = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - t) / (repeats * len(frames))


def heatmap_time(lm, frame: Path, repeats: int) -> float:
    img = load_image(frame).image
    gradcam_heatmap(lm, img)
    t = time.perf_counter()
    for _ in range(repeats):
        gradcam_heatmap(lm, img)
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", default="magnif_models/all/efficientnet_lite2_finetuned")
    ap.add_argument("--ensemble", default="magnif_models/all/efficientnet_lite2_ensemble")
    ap.add_argument("--frames", default="../shared/data/breakhis_frames")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/ensemble_latency.json")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    frames = sorted(Path(a.frames).glob("*/*.png"))[:8]
    single, ens = load_model_folder(a.single), load_model_folder(a.ensemble)
    res = {"frames": len(frames), "threads": torch.get_num_threads(), "members": len(ens.model.members)}
    res["predict_path_s"] = {"single": per_frame(single, frames, a.repeats), "ensemble": per_frame(ens, frames, a.repeats)}
    res["gradcam_s"] = {"single": heatmap_time(single, frames[0], a.repeats), "ensemble": heatmap_time(ens, frames[0], a.repeats)}
    res["ratio"] = {k: v["ensemble"] / v["single"] for k, v in (("predict_path", res["predict_path_s"]),
                                                                 ("gradcam", res["gradcam_s"]))}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
