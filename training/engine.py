"""Training machinery: compute-precision choice, image cache, augmentation, cached features, fitting."""
from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from models.archs import ARCHITECTURES, HistoClassifier, file_sha256
from models.card import PreprocessConfig
from models.metrics import _safe_auc
from models.preprocess import ImageError, frame_to_uint8, load_image, normalize_uint8

log = logging.getLogger("training")


@dataclass(frozen=True)
class Compute:
    device: torch.device
    bf16: bool
    reason: str


def select_compute(force_fp32: bool = False) -> Compute:
    """GPU if present; else bf16 autocast on CPUs with AVX512-BF16/AMX; else fp32 (logged)."""
    if torch.cuda.is_available():
        return Compute(torch.device("cuda"), torch.cuda.is_bf16_supported() and not force_fp32, "CUDA GPU")
    cap = torch.backends.cpu.get_cpu_capability()
    has_bf16 = False
    try:
        has_bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: fall back to the reported capability
        has_bf16 = cap in ("AVX512_BF16", "AMX")
    if force_fp32 or not has_bf16:
        reason = "fp32 requested" if force_fp32 else f"CPU ({cap}) lacks AVX512-BF16/AMX: training in fp32"
        log.info(reason)
        return Compute(torch.device("cpu"), False, reason)
    return Compute(torch.device("cpu"), True, f"CPU ({cap}) with AVX512-BF16/AMX: bf16 autocast + channels_last; "
                   "training keeps depthwise convolutions in fp32")


def autocast(compute: Compute):
    return torch.autocast(device_type=compute.device.type, dtype=torch.bfloat16, enabled=compute.bf16)


class Fp32DepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution that stays fp32 inside bf16 autocast. On CPU, oneDNN's bf16 depthwise backward is
    2-3x slower than its fp32 one (EfficientNet's 5x5 depthwise layers were most of a training step), while the
    pointwise convolutions gain from bf16: the mix trains faster than either (benchmarks/train_speed.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            # back to the input's dtype: the BatchNorm and activation after it stay bf16 as before (less memory traffic)
            return super().forward(x.float()).to(x.dtype)


_FP32_DEPTHWISE: dict[type, type] = {nn.Conv2d: Fp32DepthwiseConv2d}


def _fp32_depthwise_class(cls: type) -> type:
    """The fp32 variant of a Conv2d class (timm's strided depthwise layers are Conv2dSame, with TF 'same' padding)."""
    if cls not in _FP32_DEPTHWISE:
        _FP32_DEPTHWISE[cls] = type(f"Fp32Depthwise{cls.__name__}", (Fp32DepthwiseConv2d, cls), {})
    return _FP32_DEPTHWISE[cls]


class depthwise_fp32:
    """Context manager: a model's depthwise convolutions run in fp32 while it trains under CPU bf16 autocast, and
    are their own classes again afterwards (same parameters and state_dict keys; only the forward's precision
    differs). A no-op without bf16 or off the CPU (GPU bf16 depthwise kernels have no such penalty)."""

    def __init__(self, model: nn.Module, compute: Compute):
        on = compute.bf16 and compute.device.type == "cpu"
        self.swapped = [(m, type(m)) for m in model.modules() if on and isinstance(m, nn.Conv2d)
                        and not isinstance(m, Fp32DepthwiseConv2d) and m.groups > 1 and m.groups == m.in_channels]

    def __enter__(self) -> "depthwise_fp32":
        for m, cls in self.swapped:
            m.__class__ = _fp32_depthwise_class(cls)  # subclasses without state of their own: swapping is safe
        return self

    def __exit__(self, *exc) -> None:
        for m, cls in self.swapped:
            m.__class__ = cls


def cache_images(df: pd.DataFrame, cfg: PreprocessConfig, cache_dir: Path | None = None
                 ) -> tuple[torch.Tensor, np.ndarray, list[tuple[str, str]]]:
    """Decode each frame once through the inference path; returns uint8 (N,3,H,W), kept rows, skipped.

    With `cache_dir`, the decoded and resized frames are stored as one uint8 tensor file keyed by the sha256 of
    every file's bytes (in order) and the preprocessing, so a rerun (another seed, fold or recipe on the same data)
    skips decoding; a file replaced in place changes the key, and a file that fails to decode is never cached.
    """
    paths = df["path"].tolist()
    path = None
    if cache_dir is not None:
        try:
            key = hashlib.sha256("\n".join([str(cfg)] + [file_sha256(p) for p in paths]).encode()).hexdigest()[:24]
            path = Path(cache_dir) / "frames" / f"{key}.pt"
        except OSError:  # an unreadable file: decode below reports it with its reason
            path = None
        if path is not None and path.is_file():
            try:
                images = torch.load(path, weights_only=True)
                if images.dtype == torch.uint8 and len(images) == len(paths):
                    log.info("decoded frames read from the cache %s", path.name)
                    return images, np.arange(len(paths)), []
            except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
                log.warning("frame cache %s unreadable (%s): decoding again", path, exc)
    tensors, keep, skipped = [], [], []
    for i, p in enumerate(tqdm(paths, desc="decode", leave=False)):
        try:
            tensors.append(frame_to_uint8(load_image(p).image, cfg))
            keep.append(i)
        except ImageError as exc:
            skipped.append((p, str(exc)))
    if not tensors:
        raise ValueError("no readable images")
    images = torch.stack(tensors)
    if path is not None and not skipped:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.save(images, tmp)
        tmp.replace(path)
    return images, np.array(keep), skipped


# Colour augmentation strengths. "mild" is the original jitter; "hed" follows Tellez et al. (2019, "Quantifying
# the effects of data augmentation and stain color normalization..."): HED-light (each stain channel scaled by
# 1+-0.05 and shifted by +-0.05 in scikit-image's HED space) plus strong HSV/brightness/contrast jitter, which
# generalised across labs better than stain normalisation there.
COLOUR_AUGMENTATIONS = ("mild", "hed")
_MILD = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02, "hed": 0.0}
_STRONG = {"brightness": 0.15, "contrast": 0.2, "saturation": 0.25, "hue": 0.05, "hed": 0.05}


def hed_jitter(img: torch.Tensor, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    """Scale and shift each stain channel (haematoxylin, eosin, DAB) of a uint8 (3,H,W) frame in HED space."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img.permute(1, 2, 0).numpy())
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3)
    rgb = np.clip(hed2rgb(hed * alpha + beta), 0, 1)
    return torch.from_numpy((rgb * 255 + 0.5).astype(np.uint8)).permute(2, 0, 1)


def augment(batch: torch.Tensor, rng: np.random.Generator, colour: str = "mild") -> torch.Tensor:
    """Histology augmentation on uint8 frames: random crop of the full frame, flips, 90° turn, colour jitter
    ("mild", or "hed": HED stain jitter + strong HSV jitter).

    The 90° turn is drawn per batch (a turned 350x230 frame is 230x350; a fully convolutional net with
    global pooling takes either, but a batch needs one shape).
    """
    if colour not in COLOUR_AUGMENTATIONS:
        raise ValueError(f"colour augmentation must be one of {COLOUR_AUGMENTATIONS}, not {colour!r}")
    c = _STRONG if colour == "hed" else _MILD
    out = []
    _, _, h, w = batch.shape
    for img in batch:
        s = rng.uniform(0.7, 1.0)
        ch, cw = max(8, int(h * math.sqrt(s))), max(8, int(w * math.sqrt(s)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = TF.resized_crop(img, int(top), int(left), ch, cw, [h, w], antialias=True)
        if rng.random() < 0.5:
            img = img.flip(-1)
        if rng.random() < 0.5:
            img = img.flip(-2)
        if c["hed"]:
            img = hed_jitter(img, rng, c["hed"])
        img = TF.adjust_brightness(img, rng.uniform(1 - c["brightness"], 1 + c["brightness"]))
        img = TF.adjust_contrast(img, rng.uniform(1 - c["contrast"], 1 + c["contrast"]))
        img = TF.adjust_saturation(img, rng.uniform(1 - c["saturation"], 1 + c["saturation"]))
        img = TF.adjust_hue(img, rng.uniform(-c["hue"], c["hue"]))
        out.append(img)
    return torch.rot90(torch.stack(out), int(rng.integers(0, 4)), dims=(-2, -1))


def epoch_order(train_idx: np.ndarray, w_all: np.ndarray, balanced: bool, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's frame order and loss weights.

    Weighted loss (default): every frame once, each weighted so classes weigh half and patients equally.
    Balanced sampling: as many draws, with replacement, with probability proportional to those weights, and an
    unweighted loss, so a patient with 80 frames is not seen 80 times per epoch (lower-variance gradients).
    """
    if not balanced:
        return rng.permutation(train_idx), w_all
    p = w_all[train_idx] / w_all[train_idx].sum()
    return rng.choice(train_idx, size=len(train_idx), replace=True, p=p), np.ones_like(w_all)


def sample_weights(labels: np.ndarray, patients: np.ndarray, classes=(0, 1)) -> np.ndarray:
    """Class- and patient-balanced weights: each class weighs the same, each patient equally within its class."""
    labels, patients = np.asarray(labels), np.asarray(patients).astype(str)
    w = np.zeros(len(labels))
    for lab in classes:
        m = labels == lab
        pats = np.unique(patients[m])
        for p in pats:
            mp = m & (patients == p)
            w[mp] = 1.0 / (mp.sum() * len(pats) * len(classes))
    return w * len(labels)  # mean weight ~1


@torch.inference_mode()
def extract_features(model: HistoClassifier, images: torch.Tensor, cfg: PreprocessConfig, batch: int = 16,
                     tta: bool = False) -> np.ndarray:
    """Under torchrun each rank extracts a contiguous shard of the frames and all ranks gather the whole."""
    from training.distributed import sharded_rows

    return sharded_rows(lambda rows: _extract_features(model, images[rows], cfg, batch, tta), len(images))


def _extract_features(model: HistoClassifier, images: torch.Tensor, cfg: PreprocessConfig, batch: int = 16,
                      tta: bool = False) -> np.ndarray:
    """Pooled backbone features of un-augmented frames (fp32, as at inference); tta=True averages the 8 dihedral
    views' features, which for a linear head gives exactly the mean logit over the views (TTA) in one pass."""
    from models.inference import dihedral_views

    model.eval()
    feats = []
    for i in tqdm(range(0, len(images), batch), desc="features" + (" (8 views)" if tta else ""), leave=False):
        x = normalize_uint8(images[i:i + batch], cfg)
        if tta:
            feats.append(torch.stack([model.features(v) for v in dihedral_views(x)]).mean(0).float().numpy())
        else:
            feats.append(model.features(x).float().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, model.fc.in_features), np.float32)


def state_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights: two networks share frozen features exactly when this matches."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def content_sha256(images: torch.Tensor) -> str:
    """Content hash of the decoded, resized frames (not their paths: a file replaced in place changes the key)."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def cached_features(model: HistoClassifier, images: torch.Tensor, cfg: PreprocessConfig, cache_dir: Path,
                    tta: bool = False) -> np.ndarray:
    """Frozen features of the network actually given, cached on disk by the sha256 of its backbone weights, the
    frames' content and the preprocessing (a fold's freshly built model never reuses another network's features)."""
    key = hashlib.sha256("\n".join([state_sha256(model.backbone), content_sha256(images), str(cfg),
                                     "tta8" if tta else "plain"]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "features" / f"{key}.npy"
    if path.is_file():
        arr = np.load(path)
        if len(arr) == len(images):
            return arr
    arr = extract_features(model, images, cfg, tta=tta)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def fit_logistic_head(feats: np.ndarray, y: np.ndarray, w: np.ndarray, idx: np.ndarray, C: float = 1.0
                      ) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised frozen features, folded into one linear layer (weight, bias).

    scikit-learn does the fitting (lbfgs, L2); folding the scaler into the weights lets the result ship as
    the model's own `fc` layer, so the baseline recipe is a loadable model like any other.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(feats[idx])
    lr = LogisticRegression(C=C, max_iter=3000).fit(sc.transform(feats[idx]), y[idx], sample_weight=w[idx])
    weight = lr.coef_[0] / sc.scale_
    return weight, float(lr.intercept_[0] - (weight * sc.mean_).sum())


@dataclass
class FitConfig:
    recipe: str = "finetune"  # 'logreg' | 'linear' | 'finetune' (linear head, then last blocks) | 'full'
    logreg_c: float = 1.0
    head_epochs: int = 60
    finetune_epochs: int = 4
    finetune_stages: int = 2
    lr_head: float = 1e-3
    lr_finetune: float = 1e-4
    lr_full: float = 1e-3
    colour_augmentation: str = "mild"  # 'mild' | 'hed' (HED + strong HSV jitter; see augment)
    balanced_sampling: bool = False  # draw frames by class/patient weight instead of weighting the loss
    weight_decay: float = 1e-4
    batch_size: int = 16
    patience: int = 3
    seed: int = 0


@dataclass
class FitResult:
    state: dict
    val_logits: np.ndarray
    val_auc: float
    log: list[dict] = field(default_factory=list)
    phase_chosen: str = ""
    best_epoch: int = 0
    best_head_epoch: int = 0
    phases: list = field(default_factory=list)  # hybrid: per-phase schedule and best validation AUC
    twin_head: tuple | None = None  # logreg: (weight, bias) of the twin fitted without the validation patients
    temperature_note: str = ""  # how this fold's temperature was obtained (fitted, or the guard's fallback)


def weighted_bce(logit: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The one training loss: BCE on the logit, weighted per frame (class/patient balance), averaged over the batch."""
    return (nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none") * w).mean()


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class EarlyStopper:
    """The one early stopper for every recipe: it keeps the best state over all phases by validation score (AUC; the
    lower validation loss breaks ties, which are common with few validation patients), the best epoch of each phase,
    and how many evaluations ago the score last improved. Without validation patients (the refit on every patient)
    the schedule is fixed and the last state wins."""

    def __init__(self, y_val: np.ndarray, desc: str = ""):
        self.y_val, self.desc = np.asarray(y_val), desc
        self.has_val = len(self.y_val) > 0
        self.logs: list[dict] = []
        self.best: FitResult | None = None
        self.best_score: tuple | None = None
        self.phase_best: dict[str, dict] = {}
        self.stale = 0

    def start_phase(self) -> None:
        self.stale = 0

    def step(self, model: nn.Module, phase: str, epoch: int, loss: float,
             val_logits: Callable[[], np.ndarray], **extra) -> bool:
        """Log one evaluation; True when it is the best state so far (or, without validation, always)."""
        entry = {"phase": phase, "epoch": epoch, "train_loss": loss, **extra}
        self.logs.append(entry)
        if not self.has_val:
            log.info("%s %s epoch %d loss %.4f (no validation: fixed schedule)", self.desc, phase, epoch, loss)
            self.best = FitResult(snapshot(model), np.zeros(0), float("nan"), self.logs, phase, epoch)
            return True
        vl = val_logits()
        auc = _safe_auc(self.y_val, vl)
        nll = float(nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(vl).float(),
                                                                   torch.from_numpy(self.y_val).float()))
        entry.update(val_auc=auc, val_loss=nll)
        log.info("%s %s epoch %d loss %.4f val_auc %.4f val_loss %.4f", self.desc, phase, epoch, loss, auc, nll)
        score = (auc if np.isfinite(auc) else -1.0, -nll)
        pb = self.phase_best.get(phase)
        if pb is None or score > pb["score"]:
            self.phase_best[phase] = {"score": score, "epoch": epoch, "val_auc": auc}
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best = FitResult(snapshot(model), vl, auc, self.logs, phase, epoch)
            self.stale = 0
            return True
        self.stale += 1
        return False

    def best_epoch_of(self, phase: str) -> int:
        return self.phase_best.get(phase, {}).get("epoch", 0)


def predict_logits(model: nn.Module, images: torch.Tensor, cfg: PreprocessConfig, idx: np.ndarray,
                   tta: bool = False, compute: Compute | None = None) -> np.ndarray:
    """Under torchrun each rank scores a contiguous shard of idx and all ranks gather the whole, in order."""
    from training.distributed import sharded_rows

    idx = np.asarray(idx)
    return sharded_rows(lambda rows: _predict_logits(model, images, cfg, idx[rows], tta, compute), len(idx))


def _predict_logits(model: nn.Module, images: torch.Tensor, cfg: PreprocessConfig, idx: np.ndarray,
                    tta: bool = False, compute: Compute | None = None) -> np.ndarray:
    """Eval-mode logits of cached frames idx, through the same normalisation (and TTA) as inference.

    fp32 (the served precision) in channels_last memory order, which oneDNN runs about twice as fast on CPU
    (benchmarks/train_speed.py) with the same fp32 arithmetic. `compute` with bf16 runs under bf16 autocast: only
    for the per-epoch early-stopping pass, never for the out-of-fold scores a card reports.
    """
    from models.inference import tta_logits

    model.eval()
    device = next(model.parameters()).device
    was_channels_last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                            for p in model.parameters())
    model.to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode(), autocast(compute or Compute(device, False, "fp32")):
        for i in range(0, len(idx), 32):
            x = normalize_uint8(images[idx[i:i + 32]], cfg).to(device).contiguous(memory_format=torch.channels_last)
            out.append(tta_logits(model, x) if tta else model(x).float().cpu().numpy())
    if not was_channels_last:  # leave the model as it came (training keeps channels_last only under bf16)
        model.to(memory_format=torch.contiguous_format)
    return np.concatenate(out) if out else np.zeros(0)


def quality_table(paths: list[str]) -> pd.DataFrame:
    """The inference-time quality checks for each frame (blur, tissue, H&E), so metrics can be split by QC."""
    from models.quality import check_quality, qc_failures

    rows = []
    for p in tqdm(paths, desc="quality", leave=False):
        try:
            q = check_quality(load_image(p).image)
            rows.append({"blur_variance": q.blur_variance, "tissue_fraction": q.tissue_fraction,
                         "he_fraction": q.he_fraction, "qc_pass": not qc_failures(q)})
        except ImageError:
            rows.append({"blur_variance": np.nan, "tissue_fraction": np.nan, "he_fraction": np.nan, "qc_pass": False})
    return pd.DataFrame(rows)


def optimise_epoch(order, batch_size: int, loss_of: Callable, opt: torch.optim.Optimizer, desc: str = "",
                   min_batch: int = 1) -> float:
    """The one optimisation loop: walk `order` in batches, step the optimiser on loss_of(batch), return the mean
    loss per sample. Every recipe's epoch (heads on cached features, the hybrid's phase 1, the MIL head,
    fine-tuning on augmented frames) is this loop with its own loss_of."""
    tot = 0.0
    steps = range(0, len(order), batch_size)
    for i in (tqdm(steps, desc=desc, leave=False) if desc else steps):
        b = order[i:i + batch_size]
        if len(b) < min_batch:  # a batch of one breaks BatchNorm in training mode
            continue
        loss = loss_of(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tot += float(loss.detach()) * len(b)
    return tot / max(len(order), 1)


def train_augmented_epoch(model: nn.Module, images: torch.Tensor, y: np.ndarray, w_all: np.ndarray, perm: np.ndarray,
                          cfg: PreprocessConfig, compute: Compute, opt: torch.optim.Optimizer, batch_size: int,
                          rng: np.random.Generator, desc: str = "", colour: str = "mild",
                          ddp: nn.Module | None = None) -> float:
    """One epoch of weighted BCE on augmented frames (shared by fine-tuning and the hybrid's phases 2-3);
    returns the mean training loss."""
    from training.distributed import is_distributed, local_share, scale_local_loss, world

    device = next(model.parameters()).device
    net = ddp or model
    distributed = is_distributed()

    def loss_of(b: np.ndarray) -> torch.Tensor:
        # under torchrun every rank augments the whole global batch with the shared random stream (so the frames are
        # those of a one-process run) and trains on its share; the loss is scaled so DDP's average is the batch mean
        x = normalize_uint8(augment(images[b], rng, colour), cfg)
        share = local_share(len(b)) if distributed else slice(None)
        x, yb, wb = x[share], y[b][share], w_all[b][share]
        if compute.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(compute):
            logit = net(x.to(device)).float()
        yt, wt = torch.from_numpy(yb).float().to(device), torch.from_numpy(wb).float().to(device)
        if distributed:
            per_item = nn.functional.binary_cross_entropy_with_logits(logit, yt, reduction="none") * wt
            return scale_local_loss(per_item, len(b))
        return weighted_bce(logit, yt, wt)

    loss = optimise_epoch(perm, batch_size, loss_of, opt, desc or "epoch", min_batch=2 * world()[1])
    if distributed:  # the epoch's loss of the global batches (early stopping breaks AUC ties on it: ranks must agree)
        import torch.distributed as dist

        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        loss = float(t) / world()[1]
        for buf in model.buffers():  # BatchNorm statistics as rank 0 has them, so every rank validates one model
            dist.broadcast(buf, 0)
    return loss


def fit(model: HistoClassifier, arch: str, images: torch.Tensor, feats: np.ndarray | None, y: np.ndarray,
        patients: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, cfg: PreprocessConfig,
        fc: FitConfig, compute: Compute, desc: str = "") -> FitResult:
    """Fit one model; early stopping on validation AUC across phases; the best state wins."""
    torch.manual_seed(fc.seed)
    rng = np.random.default_rng(fc.seed)
    w_all = sample_weights(y, patients)
    stopper = EarlyStopper(y[val_idx], desc)
    logs = stopper.logs
    has_val = stopper.has_val

    def val_logits(phase: str):
        if phase == "head":  # the backbone is frozen: the cached features give the same logits, faster
            def head_logits() -> np.ndarray:
                with torch.inference_mode():
                    return model.fc(torch.from_numpy(feats[val_idx]).float()).squeeze(1).numpy()
            return head_logits
        return lambda: predict_logits(model, images, cfg, val_idx, compute=compute)  # early stopping only: bf16 where fast

    if fc.recipe == "logreg":
        # The frozen-feature logistic regression itself, shipped as a model. Like the baseline it is fitted on
        # every training patient (train + validation); its temperature comes from the validation patients'
        # logits of a twin fitted without them, so calibration stays out-of-sample.
        if feats is None:
            raise ValueError("the logreg recipe needs frozen features")
        vl, auc, twin = np.zeros(0), float("nan"), None
        if has_val:
            w_tr, b_tr = fit_logistic_head(feats, y, w_all, train_idx, fc.logreg_c)
            twin = (w_tr, b_tr)
            vl = feats[val_idx] @ w_tr + b_tr
            auc = _safe_auc(y[val_idx], vl)
        weight, bias = fit_logistic_head(feats, y, w_all, np.concatenate([train_idx, val_idx]), fc.logreg_c)
        with torch.no_grad():
            model.fc.weight.copy_(torch.from_numpy(weight).float().unsqueeze(0))
            model.fc.bias.fill_(bias)
        logs.append({"phase": "logreg", "epoch": 1, "val_auc": auc})
        log.info("%s logreg val_auc (twin without validation patients) %.4f", desc, auc)
        return FitResult(snapshot(model), vl, auc, logs, "logreg", 1, fc.head_epochs, twin_head=twin)

    # Phase 1: linear head on cached frozen features (cheap; the data-poor recipe).
    if fc.recipe in ("linear", "finetune"):
        if feats is None:
            raise ValueError("linear/finetune recipes need frozen features (use --recipe full for --init scratch)")
        head = model.fc
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=fc.lr_head, weight_decay=fc.weight_decay)
        X = torch.from_numpy(feats[train_idx]).float()
        Y = torch.from_numpy(y[train_idx]).float()
        W = torch.from_numpy(w_all[train_idx]).float()
        stopper.start_phase()
        for ep in range(fc.head_epochs):
            perm = torch.from_numpy(rng.permutation(len(train_idx)))
            loss = optimise_epoch(perm, fc.batch_size, lambda b: weighted_bce(head(X[b]).squeeze(1), Y[b], W[b]), opt)
            if (ep + 1) % 5 == 0 or ep == fc.head_epochs - 1:
                stopper.step(model, "head", ep + 1, loss, val_logits("head"))
                if stopper.stale >= fc.patience * 2:
                    break
        model.load_state_dict(stopper.best.state)

    # Phase 2: train the last stages (finetune) or every layer (full) on augmented frames.
    epochs = fc.finetune_epochs
    if fc.recipe in ("finetune", "full") and epochs > 0:
        stages = ARCHITECTURES[arch].stages(model.backbone)
        trainable = stages if fc.recipe == "full" else stages[-fc.finetune_stages:]
        for p in model.parameters():
            p.requires_grad_(False)
        for s in trainable:
            for p in s.parameters():
                p.requires_grad_(True)
        for p in model.fc.parameters():
            p.requires_grad_(True)
        lr = fc.lr_full if fc.recipe == "full" else fc.lr_finetune
        params = [{"params": [p for s in trainable for p in s.parameters()], "lr": lr},
                  {"params": list(model.fc.parameters()), "lr": lr if fc.recipe == "full" else fc.lr_head * 0.3}]
        opt = torch.optim.AdamW(params, weight_decay=fc.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        model = model.to(compute.device)
        if compute.bf16:
            model = model.to(memory_format=torch.channels_last)
        from training.distributed import wrap

        ddp = wrap(model, str(compute.device))  # DistributedDataParallel under torchrun, else the model itself
        stopper.start_phase()
        with depthwise_fp32(model, compute):  # CPU bf16: depthwise layers in fp32 (faster, see the class)
            for ep in range(epochs):
                model.train()
                if fc.recipe != "full":  # frozen stages keep their BatchNorm statistics
                    for s in stages[:-fc.finetune_stages]:
                        s.eval()
                perm, w_epoch = epoch_order(train_idx, w_all, fc.balanced_sampling, rng)
                t0 = time.time()
                tot = train_augmented_epoch(model, images, y, w_epoch, perm, cfg, compute, opt, fc.batch_size, rng,
                                            f"{desc} ep{ep + 1}", fc.colour_augmentation, ddp=ddp) * len(perm)
                sched.step()
                sec = time.time() - t0
                stopper.step(model, fc.recipe, ep + 1, tot / len(perm), val_logits(fc.recipe), seconds=sec,
                             ms_per_image=1000 * sec / len(perm))
                if stopper.stale >= fc.patience:
                    break
        for p in model.parameters():
            p.requires_grad_(True)
        model = model.to(memory_format=torch.contiguous_format).cpu()
    best = stopper.best
    assert best is not None
    best.log = logs
    best.best_head_epoch = stopper.best_epoch_of("head") if has_val else fc.head_epochs
    return best
