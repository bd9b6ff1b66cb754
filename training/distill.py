"""A ResNet-50 that can see (issue 18, item 6): feature distillation from the frozen ImageNet Lite2, no labels.

No ResNet-50 ImageNet weights exist here, and from scratch on 38 patients it learns little. Instead its embedding
of a native-resolution tile (230x233 BreakHis tiles, and 50x50 IDC patches upsampled to 224) is trained to
reproduce the frozen Lite2 embedding of the same image (a linear projection 2048 -> 1280 on top; MSE on the
teacher's standardised embedding; flips as augmentation). No label is read: the BreakHis frames it sees include
every cross-validation fold's test patients, which is unsupervised (transductive) use of their pixels, said
wherever its figures are shown. The result is saved as a torchvision-keyed state dict, so
`python -m training train --arch resnet50 --init FILE` fine-tunes from it and the card names it.

    python -m training distill-resnet50 --data ../shared/data/breakhis --idc ../shared/data/idc \\
        --minutes 40 --out build/distill/resnet50_lite2_distilled.safetensors
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.archs import IMAGENET_MEAN, IMAGENET_STD, file_sha256

log = logging.getLogger("training")


def student() -> nn.Module:
    """torchvision ResNet-50 from random init, its fc a 2048 -> 1280 projection onto the teacher's embedding."""
    from torchvision.models import resnet50

    m = resnet50(weights=None)
    m.fc = nn.Linear(2048, 1280)
    return m


def _normalise(u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.float() / 255 - mean) / std


def breakhis_tiles(paths: list[str]) -> torch.Tensor:
    """(N*6, 3, 230, 233) uint8 native-resolution tiles, in frozen_features' order (frame-major)."""
    from models.preprocess import load_image
    from models.tiles import tile_frame

    return torch.cat([tile_frame(load_image(p).image).pixels for p in paths])


def idc_pixels(paths: list[str], size: int = 224) -> torch.Tensor:
    """(N, 3, size, size) uint8 IDC patches, padded and upsampled exactly as training.idc.patch_features does."""
    from models.idc import pad_patch
    from models.preprocess import frame_to_uint8, load_image
    from training.idc import patch_config

    cfg = patch_config(size)
    return torch.stack([frame_to_uint8(pad_patch(load_image(p, min_side=1).image), cfg) for p in paths])


def distill(sets: list[tuple[torch.Tensor, np.ndarray]], minutes: float, batch: int = 24, lr: float = 1e-3,
            seed: int = 0, compute=None) -> tuple[nn.Module, dict]:
    """Train the student on each (uint8 images, teacher embeddings) set, alternating batches, for a time budget.

    One-cycle cosine schedule over the batches the budget allows (estimated from the first 10); returns the
    student and a record (epochs seen, loss per quarter of the run, time, compute)."""
    from training.engine import autocast, select_compute

    compute = compute or select_compute()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    allt = np.concatenate([t for _, t in sets])
    mu, sd = allt.mean(0), allt.std(0) + 1e-6  # the teacher's embedding, standardised per dimension
    targets = [torch.from_numpy((t - mu) / sd).float() for _, t in sets]
    m = student()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
    order = [(k, i) for k, (x, _) in enumerate(sets) for i in range(0, len(x), batch)]
    t0, budget, step, total, losses, seen = time.time(), minutes * 60, 0, None, [], 0
    m.train()
    while time.time() - t0 < budget:
        rng.shuffle(order)
        perms = [torch.from_numpy(rng.permutation(len(x))) for x, _ in sets]
        for k, i in order:
            if time.time() - t0 >= budget:
                break
            idx = perms[k][i:i + batch]
            x = _normalise(sets[k][0][idx])
            if rng.random() < 0.5:
                x = x.flip(3)
            if rng.random() < 0.5:
                x = x.flip(2)
            if total is not None:
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
            with autocast(compute):
                loss = nn.functional.mse_loss(m(x).float(), targets[k][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(idx)
            step += 1
            if step == 10:  # the budget in steps, from the speed of the first ten
                total = int(budget / ((time.time() - t0) / 10))
    m.eval()
    q = np.array_split(np.array(losses), 4) if len(losses) >= 4 else [np.array(losses)]
    n_images = sum(len(x) for x, _ in sets)
    return m, {"steps": step, "images_seen": seen, "epochs": seen / n_images, "minutes": (time.time() - t0) / 60,
               "loss_by_quarter": [float(a.mean()) for a in q if len(a)], "lr": lr, "batch": batch,
               "compute": compute.reason, "teacher_standardisation": "per-dimension z-score over all images"}


def save_student(m: nn.Module, out: Path, record: dict) -> None:
    """The backbone in torchvision resnet50 keys (fc dropped) + a JSON record beside it."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith("fc.")}, str(out))
    record = {**record, "file_sha256": file_sha256(out)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


@torch.inference_mode()
def student_tile_means(m: nn.Module, tiles_u8: torch.Tensor, n_frames: int, batch: int = 48) -> np.ndarray:
    """(N, 2048) mean pooled student embedding over each frame's 6 tiles (the frozen tiles_mean recipe)."""
    body = nn.Sequential(*list(m.children())[:-1])
    out = [body(_normalise(tiles_u8[i:i + batch])).flatten(1).numpy() for i in range(0, len(tiles_u8), batch)]
    return np.concatenate(out).reshape(n_frames, -1, 2048).mean(1)
