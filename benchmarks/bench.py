"""Speed benchmarks, reported as ratios measured in one run (these machines are noisy).

1. Predict path (decode a 700x460 PNG, quality check, preprocess, forward, calibrate) vs the bare forward
   on the same tensor: median latency ratio (target <= 1.5).
2. First prediction with Grad-CAM for one frame (model load + predict + heatmap), then warm.
3. Training time per image for each architecture, fp32 and bf16 autocast (bf16 is emulated and slow on
   CPUs without AVX512-BF16/AMX; the trainer then uses fp32), and the projection for a 200X
   EfficientNet-Lite2 model on the full BreakHis 200X set (2,013 frames).

Usage: python benchmarks/bench.py [--model magnif_models/100X/efficientnet_lite2] [--repeats 15] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.archs import ARCHITECTURES, build_model  # noqa: E402
from models.gradcam import gradcam_heatmap  # noqa: E402
from models.inference import load_model_folder  # noqa: E402
from models.routing import default_model_id  # noqa: E402
from training.engine import augment, select_compute  # noqa: E402

FRAME = ROOT.parent / "shared" / "data" / "breakhis_frames" / "200X"
FULL_200X_FRAMES = 2013  # BreakHis 200X: 623 benign + 1,390 malignant


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def train_ms_per_image(arch: str, bf16: bool, stages: int | None, batch: int = 4, steps: int = 2) -> float:
    """One optimiser step on augmented uint8 frames at the architecture's input size."""
    import numpy as np

    from models.card import PreprocessConfig
    from models.preprocess import normalize_uint8

    spec = ARCHITECTURES[arch]
    model, _ = build_model(arch, "scratch")
    cfg = PreprocessConfig(spec.input_size, spec.mean, spec.std)
    if stages:
        for p in model.parameters():
            p.requires_grad_(False)
        for s in spec.stages(model.backbone)[-stages:]:
            for p in s.parameters():
                p.requires_grad_(True)
        for p in model.fc.parameters():
            p.requires_grad_(True)
    model.train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    rng = np.random.default_rng(0)
    imgs = torch.randint(0, 255, (batch, 3, *spec.input_size), dtype=torch.uint8)

    def step():
        x = normalize_uint8(augment(imgs, rng), cfg)
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t) / (steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "magnif_models" / "100X" / "efficientnet_lite2"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--emulated-bf16", action="store_true",
                    help="also time bf16 autocast where the CPU lacks AVX512-BF16/AMX (very slow: emulated)")
    args = ap.parse_args()
    res: dict = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "compute_choice": select_compute().reason}
    frame = str(sorted(FRAME.glob("*.png"))[0])

    t0 = time.perf_counter()
    lm = load_model_folder(args.model)
    from models.preprocess import load_image

    img = load_image(frame).image
    p = lm.predict_images([img])
    heat = gradcam_heatmap(lm, img, "Grad-CAM", 1)
    res["first_prediction_with_gradcam_s"] = time.perf_counter() - t0
    res["warm_prediction_with_gradcam_ms"] = median_ms(
        lambda: (lm.predict_images([load_image(frame).image]), gradcam_heatmap(lm, load_image(frame).image)), 5)

    x = lm.preprocess(img).unsqueeze(0)
    bare = median_ms(lambda: lm.logits(x), args.repeats)
    from models.engine import MalignancyPredictor, SubtypePredictor

    predictor = MalignancyPredictor(lm, magnification="200X")
    full = median_ms(lambda: predictor.predict([frame]), args.repeats)
    res.update(model=lm.model_id, frame=frame, bare_forward_ms=bare, predict_path_ms=full,
               predict_over_forward_ratio=full / bare, p_check=float(p[0]), heat_shape=list(heat.shape))
    print(f"model {lm.model_id} on {Path(frame).name}: predict path {full:.1f} ms, bare forward {bare:.1f} ms, "
          f"ratio {full / bare:.2f} (target <= 1.5)")
    print(f"first prediction with Grad-CAM (load + predict + heatmap): {res['first_prediction_with_gradcam_s']:.2f} s; "
          f"warm {res['warm_prediction_with_gradcam_ms']:.0f} ms (target < 1.5 s)")
    sub_id = default_model_id("subtype", Path(args.model).resolve().parent.parent)
    if sub_id and lm.card.task_kind == "malignancy":  # Diagnose also places the frame's subtype within the call
        slm = load_model_folder(Path(args.model).resolve().parent.parent / sub_id)
        subtype = SubtypePredictor(slm)  # as Diagnose: the frame's prediction, then its subtype probabilities
        both = median_ms(lambda: (predictor.predict([frame]), subtype.predict([frame])), args.repeats)
        res.update(subtype_model=sub_id, predict_with_subtype_ms=both, predict_with_subtype_over_forward_ratio=both / bare)
        print(f"predict path + subtype ({sub_id}): {both:.1f} ms, ratio to the bare forward {both / bare:.2f} "
              "(target: the whole upload-to-prediction path < 1 s)")

    if not args.skip_training:
        res["train_ms_per_image"] = {}
        print(f"\ntraining step, ms per image ({res['compute_choice']}):")
        for arch in ARCHITECTURES:
            row = {}
            native = select_compute().bf16
            for mode, stages in (("all_layers", None), ("last_2_stages", 2)):
                for bf16 in (False, True):
                    if bf16 and not (native or args.emulated_bf16):
                        row[f"{mode}_bf16"] = float("nan")  # unsupported here; the trainer uses fp32
                        continue
                    row[f"{mode}_{'bf16' if bf16 else 'fp32'}"] = train_ms_per_image(arch, bf16, stages)
            res["train_ms_per_image"][arch] = row
            print(f"  {arch:18s} " + "  ".join(f"{k} {v:7.1f}" for k, v in row.items())
                  + ("" if native or args.emulated_bf16 else "  (bf16 nan: no AVX512-BF16/AMX on this CPU)"))
        lite = res["train_ms_per_image"]["efficientnet_lite2"]
        best = min(lite["last_2_stages_fp32"], lite["last_2_stages_bf16"]) if select_compute().bf16 else lite["last_2_stages_fp32"]
        fwd_ms = bare  # frozen-feature extraction is one forward per frame
        epochs, folds = 5, 1
        proj = (FULL_200X_FRAMES * fwd_ms + FULL_200X_FRAMES * 0.8 * epochs * best + FULL_200X_FRAMES * 0.2 * epochs * fwd_ms) / 1000 / 60
        res["projection_full_200X_lite2_minutes"] = proj
        print(f"\nprojection, EfficientNet-Lite2 200X on full BreakHis ({FULL_200X_FRAMES} frames, one fit, features + "
              f"{epochs} fine-tuning epochs of the last 2 stages + validation): {proj:.1f} min (target <= 30)")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
