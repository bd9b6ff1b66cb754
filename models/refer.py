"""Refer, don't guess: every prediction gets a decision (benign, malignant or refer) and the reason.

A frame is referred to the pathologist when (a) quality control fails, (b) it lies outside the training frames'
distribution (a Mahalanobis distance on the model's own embedding, PCA-reduced and Ledoit-Wolf shrunk; its
threshold is a quantile of held-out training frames' distances), or (c) its calibrated probability falls in an
uncertainty band around the threshold, chosen on out-of-fold predictions to reach a stated accuracy on the frames
it accepts. The policy (`refer.json` + `ood.npz` in the model folder) is written by `python -m training fit-refer`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

POLICY_FILE, OOD_FILE = "refer.json", "ood.npz"


# Why a frame was (or was not) called, as a machine key beside the sentence. A case counts the frames the model
# called and the frames it referred only as uncertain (EVIDENCE_KINDS: their probability carries signal); frames
# refused by quality control, the out-of-distribution score or the decoder never count toward a case.
DECISION_KINDS = ("call", "band", "qc", "not_he", "ood", "unreadable")
EVIDENCE_KINDS = ("call", "band")


@dataclass(frozen=True)
class Decision:
    decision: str  # "benign" | "malignant" | "refer"
    reason: str
    kind: str = "call"  # one of DECISION_KINDS

    @property
    def counts_toward_case(self) -> bool:
        return self.kind in EVIDENCE_KINDS


@dataclass
class OODScorer:
    """Distance of an embedding from the training frames' embeddings: the squared Mahalanobis distance inside a PCA
    subspace plus the squared residual outside it in units of the training frames' mean residual variance (a
    flat or synthetic image lands far off the subspace even where its projection looks ordinary)."""

    mean: np.ndarray
    components: np.ndarray  # (k, D)
    precision: np.ndarray  # (k, k)
    residual_var: float  # mean squared residual per left-out dimension, on the training frames
    threshold: float

    def score(self, emb: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(emb) - self.mean
        z = c @ self.components.T
        resid = c - z @ self.components
        return np.einsum("ij,jk,ik->i", z, self.precision, z) + (resid ** 2).sum(1) / self.residual_var

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32),
                 precision=self.precision, residual_var=np.array(self.residual_var), threshold=np.array(self.threshold))

    @classmethod
    def load(cls, path: Path) -> "OODScorer":
        """The scorer, its arrays checked for consistent shapes and finite values (PolicyError otherwise)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                mean, comp, prec = (np.asarray(z[k], np.float64) for k in ("mean", "components", "precision"))
                rv, thr = float(z["residual_var"]), float(z["threshold"])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise PolicyError(f"{path}: unreadable ({type(exc).__name__})") from None
        d = mean.shape[0] if mean.ndim == 1 else -1
        if d <= 0 or comp.ndim != 2 or comp.shape[1] != d or prec.shape != (comp.shape[0], comp.shape[0]):
            raise PolicyError(f"{path}: inconsistent shapes (mean {mean.shape}, components {comp.shape}, "
                              f"precision {prec.shape})")
        if not (np.isfinite(mean).all() and np.isfinite(comp).all() and np.isfinite(prec).all() and rv > 0
                and np.isfinite(thr)):
            raise PolicyError(f"{path}: non-finite values or a non-positive residual variance")
        return cls(mean, comp, prec, rv, thr)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


@dataclass
class ReferPolicy:
    band: tuple[float, float]  # calibrated p inside [lo, hi] is referred as uncertain
    target_accuracy: float
    accepted_accuracy: float  # out-of-fold accuracy on frames outside the band
    coverage: float  # share of out-of-fold frames outside the band
    ood_quantile: float
    ood_auroc: dict = field(default_factory=dict)
    risk_coverage: list = field(default_factory=list)
    card_sha256: str = ""
    n_frames: int = 0
    n_patients: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    case_policy: dict = field(default_factory=dict)  # models.case.CasePolicy fields + its validation (fit-refer)
    ood: OODScorer | None = None

    @property
    def ood_audit(self):
        """The OOD audit as typed fields (models.evidence.OodAudit; older files' sentence keys are read once there)."""
        from models.evidence import ood_audit

        return ood_audit(self.ood_auroc)

    @classmethod
    def load(cls, folder: str | Path) -> "ReferPolicy | None":
        """The policy in a model folder, verified before it is trusted (ReferPolicyFile: types, a band inside [0, 1]
        and ordered, a card_sha256; ood.npz matching its recorded sha256 and shaped consistently); None when the
        folder has none. Raises PolicyError (one line) for a policy that cannot be trusted."""
        folder = Path(folder)
        path = folder / POLICY_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            d = ReferPolicyFile.model_validate(raw).model_dump()
        except RecursionError:
            raise PolicyUnreadable(f"{path}: JSON nested too deeply") from None
        except ValidationError as exc:
            e = exc.errors()[0]
            raise PolicyError(f"{path}: {'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PolicyUnreadable(f"{path}: not valid JSON ({exc})") from None
        d["band"] = tuple(d["band"])
        ood_sha = d.pop("ood_sha256", "")
        pol = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "ood"})
        if (folder / OOD_FILE).is_file():
            from models.archs import file_sha256

            if not ood_sha:
                raise PolicyError(f"{folder / OOD_FILE}: no ood_sha256 in {POLICY_FILE} to verify it against")
            if file_sha256(folder / OOD_FILE) != ood_sha:
                raise PolicyError(f"{folder / OOD_FILE}: sha256 does not match the one in {POLICY_FILE}")
            pol.ood = OODScorer.load(folder / OOD_FILE)
        elif ood_sha:
            raise PolicyError(f"{folder / OOD_FILE}: missing, although {POLICY_FILE} names it")
        return pol


class PolicyError(ValueError):
    """A refer policy that cannot be trusted; the message is one line."""


class PolicyUnreadable(PolicyError):
    """A refer policy file that is not JSON at all (or nested too deeply to read)."""


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    lo, hi = band
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"band must satisfy 0 <= low <= high <= 1, got [{lo}, {hi}]")
    return band


class ReferPolicyFile(BaseModel):
    """refer.json as written by `python -m training fit-refer`, validated before anything reads it."""

    model_config = ConfigDict(extra="forbid")
    band: Annotated[tuple[float, float], AfterValidator(_check_band)]
    target_accuracy: Annotated[float, Field(ge=0, le=1)]
    accepted_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    coverage: Annotated[float, Field(ge=0, le=1)]
    ood_quantile: Annotated[float, Field(gt=0, lt=1)]
    ood_auroc: dict = {}
    risk_coverage: list = []
    card_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # required: a policy is bound to one card
    ood_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    n_frames: Annotated[int, Field(ge=0)] = 0
    n_patients: dict = {}
    notes: list = []
    case_policy: dict = {}


@torch.inference_mode()
def embed(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The model's own pooled embedding of a preprocessed batch: (B,3,H,W) frames, or (B,T,3,h,w) tiles (mean)."""
    if x.dim() == 5:  # a tile model: the mean of its tiles' pooled features
        b, t = x.shape[:2]
        f = model.pool(model.backbone(x.flatten(0, 1))).flatten(1)
        return f.view(b, t, -1).mean(1).double().numpy()
    if not hasattr(model, "features"):
        raise ValueError("this architecture exposes no pooled embedding")
    return model.features(x).double().numpy()


def decide(p: float | None, threshold: float, qc_failures: list[str], qc_out_of_distribution: bool,
           ood_score: float | None, policy: ReferPolicy | None, no_policy_reason: str = "") -> Decision:
    """The decision and its reason, checked in order of how little the probability can be trusted."""
    if p is None:
        return Decision("refer", "no prediction (the file could not be analysed)", "unreadable")
    if qc_failures:
        return Decision("refer", "quality control failed (" + ", ".join(qc_failures) + ")", "qc")
    if qc_out_of_distribution:
        return Decision("refer", "not an H&E histology frame by colour or texture", "not_he")
    if policy is not None and policy.ood is not None and ood_score is not None and ood_score > policy.ood.threshold:
        return Decision("refer", f"unlike the training frames (distance {ood_score:.0f} > {policy.ood.threshold:.0f}, "
                                 f"the {policy.ood_quantile:.0%} quantile of held-out training frames)", "ood")
    if policy is not None and policy.band[0] <= p <= policy.band[1]:
        return Decision("refer", f"uncertain: p = {p:.2f} lies in the band {policy.band[0]:.2f}-{policy.band[1]:.2f} "
                                 f"where out-of-fold accuracy falls below {policy.target_accuracy:.0%}", "band")
    label = "malignant" if p >= threshold else "benign"
    return Decision(label, "" if policy is not None else no_policy_reason or
                    "no referral policy fitted for this model: band and out-of-distribution checks not applied")


def ood_score_of(lm, img: Image.Image) -> float | None:
    """The OOD distance of one frame under a loaded model's policy, or None where the model has none."""
    pol = lm.policy
    if pol is None or pol.ood is None:
        return None
    from models.locks import model_lock

    x = lm.preprocess(img).unsqueeze(0)
    with model_lock(lm.model):
        return float(pol.ood.score(embed(lm.model, x))[0])
