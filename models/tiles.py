"""Native-resolution tiles of a frame: the nuclear detail that shrinking a 700x460 frame to 350x230 throws away.

A BreakHis frame is cut into a 2x3 grid of 230x233 tiles at its native pixel scale. Frames that BreakHis
copies ship downscaled (500x328, same 700:460 aspect) are resized to the 700x460 grid first; frames of other
sizes are tiled at their own pixels (the same physical scale only if their pixel size matches BreakHis's),
with a warning that the scale is unknown.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

REFERENCE_SIZE = (700, 460)  # (W, H) of a native BreakHis frame
GRID = (2, 3)  # rows, columns
TILE_SIZE = (230, 233)  # (H, W) = 460/2, 700/3
_ASPECT = REFERENCE_SIZE[0] / REFERENCE_SIZE[1]


@dataclass
class Tiles:
    pixels: torch.Tensor  # uint8 (T, 3, 230, 233)
    boxes: list[tuple[int, int, int, int]]  # (top, left, height, width) of each tile in `frame`
    frame: Image.Image  # the frame the boxes refer to (700x460 for BreakHis-shaped input)
    notes: list[str]


def tile_frame(img: Image.Image) -> Tiles:
    """Cut an RGB frame into native-resolution tiles (see the module docstring for the scale rules)."""
    notes: list[str] = []
    w, h = img.size
    if (w, h) != REFERENCE_SIZE and abs(w / h - _ASPECT) < 0.02 and w <= REFERENCE_SIZE[0] * 1.02:
        img = img.resize(REFERENCE_SIZE, Image.BILINEAR)  # a downscaled BreakHis frame (e.g. 500x328): back to its grid
        w, h = REFERENCE_SIZE
    elif (w, h) != REFERENCE_SIZE:
        notes.append(f"{w}x{h} is not a BreakHis frame size: tiles were cut at this image's own pixels, so their "
                     "physical scale is unknown and may differ from the training tiles")
    th, tw = TILE_SIZE
    rows, cols = max(1, round(h / th)), max(1, round(w / tw))
    t = TF.pil_to_tensor(img.convert("RGB"))
    pixels, boxes = [], []
    for r in range(rows):
        for c in range(cols):
            top, left = round(r * (h - th) / max(rows - 1, 1)) if rows > 1 else 0, round(c * (w - tw) / max(cols - 1, 1)) if cols > 1 else 0
            bh, bw = min(th, h), min(tw, w)
            tile = t[:, top:top + bh, left:left + bw]
            if tile.shape[1:] != (th, tw):
                tile = TF.resize(tile, [th, tw], antialias=True)
            pixels.append(tile)
            boxes.append((top, left, bh, bw))
    return Tiles(torch.stack(pixels), boxes, img, notes)


class GatedAttentionMIL(nn.Module):
    """Ilse et al. (2018) gated attention pooling over a frame's tile embeddings, then one logit."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, 1)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T) softmax weights over tiles."""
        return torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention(h)
        return self.fc(self.drop((a.unsqueeze(-1) * h).sum(1))).squeeze(-1)


class TiledClassifier(nn.Module):
    """A frame as a bag of native-resolution tiles: backbone per tile -> standardised pooled features ->
    attention-MIL (or mean) pooling -> one malignancy logit. Input (B, T, 3, h, w)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, pooling: str = "attention", hidden: int = 128,
                 dropout: float = 0.25):
        super().__init__()
        if pooling not in ("attention", "mean"):
            raise ValueError(f"tile pooling must be 'attention' or 'mean', not {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.head = GatedAttentionMIL(feat_dim, hidden, dropout) if pooling == "attention" else nn.Linear(feat_dim, 1)

    def tile_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, h, w) -> standardised tile embeddings (B, T, D)."""
        b, t = x.shape[:2]
        f = self.pool(self.backbone(x.flatten(0, 1))).flatten(1)
        return ((f - self.feat_mean) / self.feat_std).view(b, t, -1)

    def bag_logit(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h) if self.pooling == "attention" else self.head(h.mean(1)).squeeze(-1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) weight of each tile in the frame's prediction (uniform for mean pooling)."""
        h = self.tile_features(x)
        if self.pooling == "mean":
            return torch.full(h.shape[:2], 1.0 / h.shape[1])
        return self.head.attention(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bag_logit(self.tile_features(x))
