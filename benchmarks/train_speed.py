"""Training speed of the routed recipe (issue 25 item 5): old vs new pipeline, minutes and ratio from one run.

The recipe (`scripts/train_shipped_models.sh generalisation`: pooled Lite2, full fine-tuning, 6 epochs, 5 folds + refit,
batch 16) is too long to run twice here, so this measures each part's cost on the real frames in one process and
multiplies by the recipe's counts (steps, validation passes, out-of-fold and TTA frames, decoding):

- old: every frame decoded on every run; every evaluation pass (per-epoch validation, out-of-fold scores, 8-view
  TTA) in fp32 with the default memory order;
- new: decoded frames read from the content-keyed cache (training.engine.cache_images); fp32 evaluation in
  channels_last (same arithmetic, oneDNN's faster kernels); the per-epoch early-stopping pass in bf16 where the CPU has
  AVX512-BF16/AMX (the out-of-fold scores stay fp32); under CPU bf16 autocast the depthwise convolutions train in fp32
  (training.engine.depthwise_fp32: oneDNN's bf16 depthwise backward is the slow part of a bf16 step).

Training steps use the precision the CPU flags choose (training.engine.select_compute) in both (old: every layer
under bf16 autocast; new: depthwise layers fp32); an fp32-only line shows what an AVX2 machine pays. With --run
FOLDER, the wall-clock minutes that run actually took (its card) are printed beside the projection.

    python benchmarks/train_speed.py [--data ../shared/data/breakhis] [--run build/speed/s0_t0]
        [--paired-with magnif_models/all/efficientnet_lite2_finetuned]

--paired-with OLD: the run trained by the old pipeline with the same command and seeds; the new run's out-of-fold AUC
minus OLD's on the same frames and folds, with its paired patient-bootstrap 95% CI (the speed-up must not move it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.archs import build_model  # noqa: E402
from models.card import PreprocessConfig  # noqa: E402
from models.preprocess import normalize_uint8  # noqa: E402
from training.data import index_source  # noqa: E402
from training.engine import (Compute, augment, autocast, cache_images, depthwise_fp32, select_compute,  # noqa: E402
                             weighted_bce)

FOLDS, EPOCHS, BATCH, VAL_SHARE = 5, 6, 16, 0.2  # the routed recipe's schedule (card hyperparameters)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive creation)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def step_seconds(images: torch.Tensor, cfg: PreprocessConfig, compute: Compute, repeats: int,
                 fp32_depthwise: bool = True) -> float:
    """One optimiser step on an augmented batch of 16, as train_augmented_epoch runs it (fp32_depthwise=False: the
    old step, every layer under bf16 autocast)."""
    model, _ = build_model("efficientnet_lite2", "scratch")
    model.train()
    if compute.bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    rng = np.random.default_rng(0)

    def step() -> None:
        x = normalize_uint8(augment(images[:BATCH], rng, "hed"), cfg)
        if compute.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(compute):
            loss = weighted_bce(model(x).float(), torch.ones(BATCH), torch.ones(BATCH))
        opt.zero_grad()
        loss.backward()
        opt.step()

    with depthwise_fp32(model, compute if fp32_depthwise else Compute(compute.device, False, "")):
        return timed(step, repeats)


def eval_seconds_per_frame(images: torch.Tensor, cfg: PreprocessConfig, channels_last: bool, bf16: bool,
                           repeats: int) -> float:
    model, _ = build_model("efficientnet_lite2", "scratch")
    model.eval()
    x = normalize_uint8(images[:32], cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return timed(run, repeats) / len(x)


def paired_runs(new: Path, old: Path) -> dict:
    """New run minus old run: out-of-fold AUC on the same frames and folds (training.compare.paired_runs), refusing
    runs of another recipe or other seeds."""
    from training.compare import paired_runs as paired_difference
    from training.frozen_cv import recipe_of

    cards = [json.loads((f / "card.json").read_text()) for f in (new, old)]

    def same(c: dict) -> dict:  # repeats-cv's test of one recipe, plus both seeds (older cards trained with --seed)
        hp = c["hyperparameters"]
        return {**recipe_of(hp), "seed": hp["seed"], "train_seed": hp.get("train_seed", hp["seed"])}

    if same(cards[0]) != same(cards[1]):
        raise SystemExit(f"{new} and {old} are not the same command and seeds: {same(cards[0])} vs {same(cards[1])}")
    r = paired_difference(new, old)
    return {**r["pooled"], "new_run": str(new), "old_run": str(old), "new_minutes": r["minutes"]["challenger"],
            "old_minutes": r["minutes"]["incumbent"], "new_compute": cards[0]["recipe"].get("compute"),
            "old_compute": cards[1]["recipe"].get("compute")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/breakhis")
    ap.add_argument("--run", default=None, help="a model folder trained by the new pipeline: its real minutes")
    ap.add_argument("--paired-with", default=None, help="the old pipeline's run of the same command and seeds")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/train_speed.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = PreprocessConfig(input_size=(230, 350), mean=(0.5,) * 3, std=(0.5,) * 3)
    with tempfile.TemporaryDirectory() as tmp:
        df = index_source(a.data, Path(tmp)).frame
        t = time.perf_counter()
        images, _, _ = cache_images(df, cfg)  # old: decode every frame
        decode_old = time.perf_counter() - t
        cache_images(df, cfg, Path(tmp))  # fills the cache
        t = time.perf_counter()
        cache_images(df, cfg, Path(tmp))  # new: a cache hit (hashing every file + one tensor read)
        decode_new = time.perf_counter() - t
    n = len(images)
    compute = select_compute()
    fp32 = Compute(torch.device("cpu"), False, "fp32")
    step_old = step_seconds(images, cfg, compute, a.repeats, fp32_depthwise=False)
    step = step_seconds(images, cfg, compute, a.repeats) if compute.bf16 else step_old
    step_fp32 = step if not compute.bf16 else step_seconds(images, cfg, fp32, a.repeats)
    ev_old = eval_seconds_per_frame(images, cfg, False, False, a.repeats)
    ev_new = eval_seconds_per_frame(images, cfg, True, False, a.repeats)
    ev_val_new = eval_seconds_per_frame(images, cfg, True, True, a.repeats) if compute.bf16 else ev_new

    train_per_fold = n * (FOLDS - 1) / FOLDS * (1 - VAL_SHARE)
    val_per_fold = n * (FOLDS - 1) / FOLDS * VAL_SHARE
    steps = FOLDS * EPOCHS * math.ceil(train_per_fold / BATCH) + EPOCHS * math.ceil(n / BATCH)
    val_frames = FOLDS * EPOCHS * val_per_fold
    oof_frames = n + n  # out-of-fold scores + the refit's cross-magnification/quality pass
    tta_frames = 8 * (n + FOLDS * val_per_fold)  # --tta-eval: test frames and validation frames, 8 views each

    def minutes(step_s: float, val_s: float, eval_s: float, decode_s: float, tta: bool) -> float:
        return (steps * step_s + val_frames * val_s + (oof_frames + (tta_frames if tta else 0)) * eval_s + decode_s) / 60

    res = {"compute": compute.reason, "frames": n, "counts": {"optimiser_steps": steps, "validation_frames": val_frames,
                                                              "out_of_fold_frames": oof_frames, "tta_frames": tta_frames},
           "seconds": {"train_step_old": step_old, "train_step": step, "train_step_fp32": step_fp32,
                       "eval_frame_fp32_old": ev_old,
                       "eval_frame_fp32_channels_last": ev_new, "validation_frame_new": ev_val_new,
                       "decode_old": decode_old, "decode_cache_hit": decode_new}}
    rows = []
    for tta in (True, False):
        old = minutes(step_old, ev_old, ev_old, decode_old, tta)
        new = minutes(step, ev_val_new, ev_new, decode_new, tta)
        old_fp32 = minutes(step_fp32, ev_old, ev_old, decode_old, tta)
        new_fp32 = minutes(step_fp32, ev_new, ev_new, decode_new, tta)
        rows.append({"tta_eval": tta, "old_minutes": old, "new_minutes": new, "ratio_old_over_new": old / new,
                     "fp32_only_old_minutes": old_fp32, "fp32_only_new_minutes": new_fp32,
                     "fp32_only_ratio": old_fp32 / new_fp32})
    res["projection"] = rows
    if a.run:
        card = json.loads((Path(a.run) / "card.json").read_text())
        res["measured_run"] = {"run": a.run, "minutes": card["training_time_s"] / 60,
                               "tta_eval": card["hyperparameters"].get("eval_tta"), "compute": card["recipe"].get("compute")}
    if a.run and a.paired_with:
        res["paired_auc"] = paired_runs(Path(a.run), Path(a.paired_with))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"compute: {compute.reason}")
    print(f"per step {step_old:.2f} s -> {step:.2f} s (fp32 {step_fp32:.2f} s); "
          f"eval per frame fp32 {ev_old * 1000:.0f} ms -> channels_last "
          f"{ev_new * 1000:.0f} ms, validation {ev_val_new * 1000:.0f} ms; decode {decode_old:.1f} s -> {decode_new:.1f} s")
    print("| recipe | old min | new min | old/new | fp32-only old | fp32-only new | fp32 old/new |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'with' if r['tta_eval'] else 'without'} --tta-eval | {r['old_minutes']:.1f} | {r['new_minutes']:.1f} | "
              f"{r['ratio_old_over_new']:.2f} | {r['fp32_only_old_minutes']:.1f} | {r['fp32_only_new_minutes']:.1f} | "
              f"{r['fp32_only_ratio']:.2f} |")
    if a.run:
        m = res["measured_run"]
        print(f"measured: {m['run']} took {m['minutes']:.1f} min ({m['compute']}; tta_eval={m['tta_eval']})")
    if "paired_auc" in res:
        d = res["paired_auc"]
        print(f"out-of-fold AUC new {d['auc_challenger']:.3f} vs old {d['auc_incumbent']:.3f}: difference "
              f"{d['difference']:+.3f} (paired patient-bootstrap 95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}; "
              f"{d['n_images']} frames, {d['n_patients']['benign']} benign / {d['n_patients']['malignant']} malignant "
              f"patients); old {d['old_minutes']:.1f} min ({d['old_compute']}), new {d['new_minutes']:.1f} min")


if __name__ == "__main__":
    main()
