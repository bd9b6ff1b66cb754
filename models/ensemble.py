"""A seed ensemble served as one model (issue 25): K full training runs of one recipe that differ only in their
training seed, their logits averaged. Each member's weights file and sha256 are listed in the card
(`arch_config.members`) and verified at load; the temperature and refer policy are fitted on the ensemble's own
out-of-fold logits (training.ensemble)."""
from __future__ import annotations

import torch
from torch import nn


class SeedEnsemble(nn.Module):
    """K networks of one architecture; the logit is the mean of theirs, the embedding their concatenation."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B) logits of every member: their spread is the ensemble's disagreement on a frame."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(x) for m in self.members], 1)

    def logit_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m.logit_and_features(x) for m in self.members]
        return torch.stack([o[0] for o in outs]).mean(0), torch.cat([o[1] for o in outs], 1)
