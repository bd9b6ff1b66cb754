"""Hybrid CNN + ViT classifier: two branches, fused as in the published BreakHis system we follow.

Default here (no pretrained ViT exists on this machine): the CNN branch is EfficientNet-Lite2 and the ViT
branch reads the CNN's last feature map as its token sequence (the "hybrid" ViT of Dosovitskiy et al.,
2021, sec. 3.1: 1x1 patch embedding of CNN features, class token, a few transformer encoder blocks), small
enough to train from scratch on little data. The published pairing (`cnn=efficientnet_v2_s`,
`vit=vit_b_16`, torchvision builders) is also buildable; there the ViT branch reads the image itself.

Fusion (as published): concat(pooled CNN features, ViT class token) -> LayerNorm -> Linear 1024 -> GELU ->
LayerNorm -> Dropout -> Linear 1024; head: LayerNorm -> Linear 512 -> GELU -> Dropout -> Linear 1.
An optional magnification embedding is concatenated to the fused features.
"""
from __future__ import annotations

import torch
from torch import nn

MAG_INDEX = {"40X": 0, "100X": 1, "200X": 2, "400X": 3}
DEFAULT_HYBRID = {"cnn": "efficientnet_lite2", "vit": "hybrid", "vit_dim": 256, "vit_depth": 2, "vit_heads": 4,
                  "fusion_dim": 1024, "head_dim": 512, "dropout": 0.3, "magnification_embedding": 0}


class TokenViT(nn.Module):
    """ViT encoder whose tokens are a 1x1 projection of a CNN feature map (hybrid ViT)."""

    def __init__(self, in_ch: int, dim: int = 256, depth: int = 2, heads: int = 4, grid: tuple[int, int] = (8, 11),
                 dropout: float = 0.1):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid = tuple(grid)
        self.proj = nn.Conv2d(in_ch, dim, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=2.0, qkv_bias=True, proj_drop=dropout,
                                            attn_drop=dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim
        self.last_grid: tuple[int, int] = self.grid  # read by the Grad-CAM reshape transform

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        t = self.proj(fmap)
        b, d, h, w = t.shape
        self.last_grid = (h, w)
        pos = self.pos_embed
        if (h, w) != self.grid:  # other frame shapes (a quarter-turned TTA view): interpolate the position grid
            pos = resample_abs_pos_embed(pos, [h, w], old_size=list(self.grid), num_prefix_tokens=0)
        t = t.flatten(2).transpose(1, 2) + pos
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        return self.norm(self.blocks(t))


class ImageViT(nn.Module):
    """A plain torchvision ViT reading the frame itself (resized to its fixed input size), returning tokens."""

    def __init__(self, name: str = "vit_b_16"):
        super().__init__()
        import torchvision.models as tvm

        self.vit = getattr(tvm, name)(weights=None)
        self.vit.heads = nn.Identity()
        self.out_dim = self.vit.hidden_dim
        s = self.vit.image_size // self.vit.patch_size
        self.last_grid = (s, s)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(image, size=(self.vit.image_size,) * 2, mode="bilinear", align_corners=False)
        x = self.vit._process_input(x)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.vit.encoder(x)


class HybridClassifier(nn.Module):
    """CNN branch + ViT branch, fused; one malignancy logit. `backbone` is the CNN (stage-wise fine-tuning)."""

    def __init__(self, backbone: nn.Module, cnn_dim: int, vit: nn.Module, vit_reads: str, fusion_dim: int = 1024,
                 head_dim: int = 512, dropout: float = 0.3, magnification_embedding: int = 0):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.vit = vit
        self.vit_reads = vit_reads  # 'cnn' (hybrid tokens) | 'image'
        d = cnn_dim + vit.out_dim
        self.fusion = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, fusion_dim), nn.GELU(), nn.LayerNorm(fusion_dim),
                                    nn.Dropout(dropout), nn.Linear(fusion_dim, fusion_dim))
        self.mag_embed = nn.Embedding(len(MAG_INDEX), magnification_embedding) if magnification_embedding else None
        h_in = fusion_dim + magnification_embedding
        self.head = nn.Sequential(nn.LayerNorm(h_in), nn.Linear(h_in, head_dim), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(head_dim, 1))
        self.cnn_identity = nn.Identity()  # Grad-CAM hook point on the CNN feature map used by both branches

    def forward_from_features(self, fmap: torch.Tensor, image: torch.Tensor | None = None,
                              magnification: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a (frozen or cached) CNN feature map; `image` only for a ViT branch that reads pixels."""
        fmap = self.cnn_identity(fmap)
        tokens = self.vit(fmap if self.vit_reads == "cnn" else image)
        z = self.fusion(torch.cat([self.pool(fmap).flatten(1), tokens[:, 0]], dim=1))
        if self.mag_embed is not None:
            if magnification is None:
                raise ValueError("this model was trained with a magnification embedding: pass the magnification")
            z = torch.cat([z, self.mag_embed(magnification)], dim=1)
        return self.head(z).squeeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled CNN features (what a frozen-feature baseline reads)."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward(self, x: torch.Tensor, magnification: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_from_features(self.backbone(x), x, magnification)


def vit_token_reshape(model: HybridClassifier):
    """pytorch-grad-cam reshape_transform for the ViT branch: drop the class token, tokens -> (B, C, h, w)."""

    def reshape(t: torch.Tensor) -> torch.Tensor:
        h, w = model.vit.last_grid
        return t[:, 1:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return reshape
