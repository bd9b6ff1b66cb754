"""Load a model folder (verifying its sha256 first) and run its network: logits and calibrated probabilities for
preprocessed batches. Decoding, quality control, decisions and results belong to the engine (models.engine)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from models.archs import HistoClassifier, build_model, file_sha256
from models.card import MAGNIFICATIONS, ModelCard  # noqa: F401  (MAGNIFICATIONS: re-exported by models)
from models.folders import IDC_DIR, SUBTYPE_DIR, TASK_DIRS, list_model_folders  # noqa: F401
from models.locks import model_lock
from models.metrics import apply_temperature
from models.preprocess import frame_to_tensor
from models.refer import ReferPolicy, embed

class ModelIntegrityError(RuntimeError):
    """The weights on disk are not the ones the card vouches for."""


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a (B,3,H,W) batch: 4 quarter turns of the frame and of its mirror image."""
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def tta_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Mean logit over the 8 dihedral views (test-time augmentation), float64."""
    return np.mean([model(v).double().cpu().numpy() for v in dihedral_views(x)], axis=0)


@dataclass
class LoadedModel:
    card: ModelCard
    model: HistoClassifier
    folder: Path
    policy: ReferPolicy | None = None  # refer-when-unsure policy (refer.json), when fitted for this very card
    policy_note: str = ""  # why there is no policy (none fitted, fitted for another card, unreadable)
    card_sha256: str = ""  # of card.json as loaded: hashed once here, reused by the policy check and every export

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def case_policy(self):
        """The case-level policy fitted with this model's refer policy (models.case.CasePolicy), or None."""
        from models.case import CasePolicy

        return CasePolicy.from_dict(self.policy.case_policy) if self.policy is not None else None

    def temperature_for(self, magnification: str | None = None) -> float:
        """The calibration temperature at a magnification: the card's own for it where it was fitted on enough
        out-of-fold patients (card.temperature_by_magnification), else the pooled one."""
        entry = (self.card.temperature_by_magnification or {}).get(magnification or "")
        return float(entry["temperature"]) if entry else self.card.temperature

    def calibration_note(self, magnification: str | None = None) -> str:
        """Which temperature applies at this magnification, and why (the Diagnose page says it)."""
        entry = (self.card.temperature_by_magnification or {}).get(magnification or "")
        if entry:
            return f"temperature {entry['temperature']:.2f} fitted for {magnification} ({entry['source']})"
        if self.card.temperature_by_magnification:
            return f"pooled temperature {self.card.temperature:.2f} (no per-magnification fit for {magnification})"
        return f"temperature {self.card.temperature:.2f} (one for every magnification)"

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        """Raw logits for a preprocessed (B,3,H,W) batch, fp32 so evaluate and predict agree exactly.

        tta=True averages the logits of the 8 dihedral views (4 quarter turns x horizontal flip).
        """
        x = batch.float()
        with model_lock(self.model):
            return tta_logits(self.model, x) if tta else self.model(x).double().numpy()

    def probabilities(self, batch: torch.Tensor, tta: bool = False, magnification: str | None = None) -> np.ndarray:
        """Calibrated p(malignant) for a preprocessed batch (the magnification's temperature where the card has one)."""
        return apply_temperature(self.logits(batch, tta), self.temperature_for(magnification))

    def preprocess(self, img: Image.Image, notes: list[str] | None = None) -> torch.Tensor:
        return frame_to_tensor(img, self.card.preprocess, notes)

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 16, tta: bool = False,
                       notes: Sequence[list[str]] | None = None, embeddings: list | None = None,
                       magnification: str | None = None) -> np.ndarray:
        """Calibrated p(malignant) for RGB PIL frames; preprocessing notes (stain failures) go to notes[i].

        With `embeddings` (a list to fill) and a referral policy, each frame's OOD distance is appended too; for a
        plain classifier it comes from the same forward pass as the logit (the head reads the pooled features)."""
        notes = notes if notes is not None else [[] for _ in images]
        if self.card.preprocess.tiles:
            batch_size = 1  # frames of unusual size give other tile counts: one bag at a time
        want_ood = embeddings is not None and self.policy is not None and self.policy.ood is not None
        one_pass = want_ood and not tta and hasattr(self.model, "logit_and_features")
        temperature = self.temperature_for(magnification)
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im, n) for im, n in zip(images[i:i + batch_size], notes[i:i + batch_size])])
            if one_pass:
                with model_lock(self.model), torch.inference_mode():
                    z, f = self.model.logit_and_features(x.float())
                out.append(apply_temperature(z.double().numpy(), temperature))
                embeddings.extend(self.policy.ood.score(f.double().numpy()))
                continue
            out.append(self.probabilities(x, tta, magnification))
            if want_ood:
                with model_lock(self.model):
                    embeddings.extend(self.policy.ood.score(embed(self.model, x.float())))
        return np.concatenate(out) if out else np.zeros(0)

    def label_for(self, p: float) -> str:
        return "malignant" if p >= self.card.threshold else "benign"


def load_model_folder(folder: str | Path, verify: bool = True) -> LoadedModel:
    """Build the card's architecture and load its weights, refusing weights whose sha256 differs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{folder}: no card.json; not a model folder")
    card = ModelCard.from_json(card_path)
    weights = folder / card.weights_file
    if not weights.is_file():
        why = "; the card is an evaluation-only run (--cv-only): it has no final model" if not card.weights_sha256 else ""
        raise FileNotFoundError(f"{weights}: weights file missing{why}")
    members = (card.arch_config or {}).get("members") if card.architecture == "seed_ensemble" else None
    if verify and not members:  # an ensemble's files (weights_file is member 0) are each verified below, once
        digest = file_sha256(weights)
        if digest != card.weights_sha256:
            raise ModelIntegrityError(
                f"{weights}: sha256 {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…; "
                "refusing to load modified or corrupt weights")
    model, _ = build_model(card.architecture, "scratch", card.arch_config or None)  # weights: our own file below
    if members:
        # a seed ensemble: every member's file is verified against the sha256 the card lists for it, then loaded
        for i, m in enumerate(members):
            name = str(m.get("weights_file", ""))
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ModelIntegrityError(f"{folder}: member {i} names no plain weights file ({name!r})")
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: ensemble member {i} weights file missing")
            if verify and file_sha256(path) != m.get("weights_sha256"):
                raise ModelIntegrityError(f"{path}: sha256 does not match the card's for member {i}; refusing to load "
                                          "modified or corrupt weights")
            state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            model.members[i].load_state_dict(state, strict=True)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    model.eval()
    card_sha = file_sha256(card_path)
    return LoadedModel(card, model, folder, *load_policy(folder, card_sha, card.threshold, embedding_dim(model)),
                       card_sha256=card_sha)


def load_policy(folder: Path, card_sha256: str, threshold: float = 0.5, embedding_dim: int | None = None
                ) -> tuple[ReferPolicy | None, str]:
    """The refer policy fitted for this card, verified, or None and why: a policy fitted for another version of the
    card, one that cannot be read or fails its checks (models.refer.ReferPolicy.load), one whose band does not contain
    the card's threshold or whose OOD scorer does not fit the model's embedding is not used, and every decision then
    says so (never a silent fallback)."""
    from models.refer import PolicyError, PolicyUnreadable

    try:
        pol = ReferPolicy.load(folder)
    except PolicyUnreadable as exc:
        return None, f"the referral policy could not be read ({str(exc).split(': ', 1)[-1]}): band and " \
                     "out-of-distribution checks not applied"
    except PolicyError as exc:
        return None, f"the referral policy was refused ({str(exc).split(': ', 1)[-1]}): band and out-of-distribution " \
                     "checks not applied"
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return None, f"the referral policy could not be read ({type(exc).__name__}): band and out-of-distribution " \
                     "checks not applied"
    if pol is None:
        return None, "no referral policy fitted for this model: band and out-of-distribution checks not applied"
    if pol.card_sha256 != card_sha256:
        return None, "the referral policy was fitted for another version of this card and is not used: band and " \
                     "out-of-distribution checks not applied"
    if not pol.band[0] <= threshold <= pol.band[1]:
        return None, f"the referral policy was refused (its band {pol.band[0]:.2f}-{pol.band[1]:.2f} does not contain " \
                     f"the model's threshold {threshold:.2f}): band and out-of-distribution checks not applied"
    if pol.ood is not None and embedding_dim is not None and pol.ood.dim != embedding_dim:
        return None, f"the referral policy was refused (its OOD scorer expects {pol.ood.dim}-dim embeddings, the model " \
                     f"gives {embedding_dim}): band and out-of-distribution checks not applied"
    return pol, ""


def embedding_dim(model: torch.nn.Module) -> int | None:
    """The width of a model's pooled embedding (the OOD scorer's input), where the architecture states it: a linear
    head's input, or for a seed ensemble the concatenation of its members' (models.ensemble)."""
    members = getattr(model, "members", None)
    if members is not None:
        dims = [embedding_dim(m) for m in members]
        return None if any(d is None for d in dims) else int(sum(dims))
    fc = getattr(model, "fc", None)
    return int(fc.in_features) if isinstance(fc, torch.nn.Linear) else None
