"""Architecture registry: one builder per architecture, each with a single-logit binary head.

Initialisation is always explicit (`imagenet`, `scratch` or a local weights file) and never falls
back silently: a failure raises `InitError` naming the alternatives.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.config import lite2_init_hint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class InitError(RuntimeError):
    """Raised when the requested initialisation cannot be honoured."""


class HistoClassifier(nn.Module):
    """Backbone feature map -> global average pool -> dropout -> one malignancy logit."""

    def __init__(self, backbone: nn.Module, feat_dim: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feat_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, feat_dim): what the linear head and the baseline read."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x))).squeeze(1)

    def logit_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logit and the pooled embedding from one forward pass (prediction + OOD score at once)."""
        f = self.features(x)
        return self.fc(self.dropout(f)).squeeze(1), f


@dataclass(frozen=True)
class ArchSpec:
    """Everything the code needs to know about an architecture (timm's registry + pretrained_cfg, in one object)."""

    name: str
    feat_dim: int
    cam_layer: str  # module path inside the classifier whose activations Grad-CAM reads
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]  # (H, W) of the whole resized frame; 700x460 keeps its aspect
    make_backbone: Callable[[], nn.Module] | None = None
    stages: Callable[[nn.Module], list[nn.Module]] | None = None  # ordered stem..last block, for partial fine-tuning
    imagenet_loader: Callable[[nn.Module], None] | None = None
    imagenet_hint: str = "--init scratch"
    # Checkpoint keys (torchvision / timm naming) -> this backbone's keys; used by --init FILE and by --init imagenet.
    remap_keys: Callable[[dict], dict] = lambda state: state
    # Composite architectures (hybrid, tiles) build themselves from a config and take their preprocessing from a
    # backbone: builder(init, arch_config, vit_init) -> (model, init record); spec_for(arch_config) -> ArchSpec.
    builder: Callable[..., tuple[nn.Module, dict]] | None = None
    spec_for: Callable[[dict | None], "ArchSpec"] | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture to the registry (one name, one spec); CLIs and loaders read only the registry."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_archs(backbones_only: bool = False) -> list[str]:
    """Registered architecture names (backbones_only: those usable as a plain backbone or a hybrid/tile branch)."""
    return sorted(n for n, s in _REGISTRY.items() if not (backbones_only and s.builder))


def get_arch(name: str) -> ArchSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose from {list_archs()}")
    return _REGISTRY[name]


def _resnet50_backbone() -> nn.Module:
    from torchvision.models import resnet50

    m = resnet50(weights=None)
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _densenet121_backbone() -> nn.Module:
    from torchvision.models import densenet121

    return nn.Sequential(densenet121(weights=None).features, nn.ReLU(inplace=False))


def _lite2_backbone() -> nn.Module:
    import timm

    # num_classes=0 and global_pool='' make forward() return the (B,1280,h,w) feature map.
    return timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0, global_pool="")


def _torchvision_imagenet(weights_enum_name: str, builder_name: str, prefix_map: Callable[[dict], dict]):
    def load(backbone: nn.Module) -> None:
        import torchvision.models as tvm

        weights = getattr(tvm, weights_enum_name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # network or cache failure: never continue with random weights
            raise InitError(
                f"--init imagenet: torchvision could not provide {weights_enum_name}.IMAGENET1K_V1 "
                f"({type(exc).__name__}: {exc}). Put the file in torch's hub cache, pass a local file "
                f"with --init FILE, or train with --init scratch."
            ) from exc
        load_torchvision_state(backbone, prefix_map(state))

    return load


def _resnet_prefix(state: dict) -> dict:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    out = {}
    for k, v in state.items():
        head = k.split(".")[0]
        if head in names:
            out[f"{names.index(head)}.{k[len(head) + 1:]}"] = v
    return out


def _densenet_prefix(state: dict) -> dict:
    import re

    out = {}
    for k, v in state.items():
        if k.startswith("features."):
            # old torchvision checkpoints use 'norm.1' instead of 'norm1'
            k = re.sub(r"\.(norm|relu|conv)\.(\d+)\.", r".\1\2.", k)
            out["0." + k[len("features."):]] = v
    return out


def _lite2_imagenet(backbone: nn.Module) -> None:
    import timm

    try:
        ref = timm.create_model("tf_efficientnet_lite2", pretrained=True)
    except Exception as exc:
        raise InitError(
            f"--init imagenet: timm could not fetch tf_efficientnet_lite2 weights ({type(exc).__name__}). "
            f"Pass the local file instead: {lite2_init_hint()}"
        ) from exc
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")}
    backbone.load_state_dict(state, strict=True)


def load_torchvision_state(backbone: nn.Module, state: dict) -> None:
    """Strictly load backbone weights; a missing or unexpected key is an error, not a warning."""
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InitError(f"weights do not fit the backbone: missing={missing[:5]} unexpected={unexpected[:5]}")


def _lite2_stages(b: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([b.conv_stem, b.bn1]), *list(b.blocks), nn.ModuleList([b.conv_head, b.bn2])]


def _seq_stages(b: nn.Module) -> list[nn.Module]:
    children = list(b.children())
    if len(children) == 8:  # resnet: stem (4 modules) then 4 layers
        return [nn.ModuleList(children[:4]), *children[4:]]
    feats = children[0]  # densenet: features then relu
    return [*list(feats.children()), children[1]]


def _effv2s_backbone() -> nn.Module:
    from torchvision.models import efficientnet_v2_s

    return efficientnet_v2_s(weights=None).features


def _effv2s_prefix(state: dict) -> dict:
    return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}


def _when(cond: Callable[[dict], bool], fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """Remap only checkpoints in the foreign naming (a file saved from our own backbone passes through)."""
    return lambda state: fn(state) if cond(state) else state


register_arch(ArchSpec(
    "efficientnet_lite2", 1280, "backbone.bn2", LITE_MEAN, LITE_STD, (230, 350), _lite2_backbone, _lite2_stages,
    _lite2_imagenet, "--init BREAKHIS_LITE2_WEIGHTS (default ../shared/weights/efficientnet_lite2_in1k.safetensors)"))
register_arch(ArchSpec(
    "resnet50", 2048, "backbone.7", IMAGENET_MEAN, IMAGENET_STD, (112, 170), _resnet50_backbone, _seq_stages,
    _torchvision_imagenet("ResNet50_Weights", "resnet50", _resnet_prefix),
    "--init scratch (no ResNet-50 ImageNet weights are available here)",
    remap_keys=_when(lambda s: "conv1.weight" in s, _resnet_prefix)))
register_arch(ArchSpec(
    "densenet121", 1024, "backbone.1", IMAGENET_MEAN, IMAGENET_STD, (230, 350), _densenet121_backbone, _seq_stages,
    _torchvision_imagenet("DenseNet121_Weights", "densenet121", _densenet_prefix), "--init scratch",
    remap_keys=_when(lambda s: any(k.startswith("features.") for k in s), _densenet_prefix)))
# The published hybrid's CNN branch (buildable; no ImageNet weights for it exist on this machine).
register_arch(ArchSpec(
    "efficientnet_v2_s", 1280, "backbone.7", IMAGENET_MEAN, IMAGENET_STD, (230, 350), _effv2s_backbone,
    lambda b: list(b.children()), _torchvision_imagenet("EfficientNet_V2_S_Weights", "efficientnet_v2_s", _effv2s_prefix),
    "--init scratch", remap_keys=_when(lambda s: any(k.startswith("features.") for k in s), _effv2s_prefix)))
# Backbone architectures (a HistoClassifier around one backbone), as the baseline and the branches look them up.
ARCHITECTURES = {n: _REGISTRY[n] for n in list_archs()}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_weight_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def _init_backbone(arch: str, backbone: nn.Module, init: str) -> dict:
    """Apply `init` to a bare backbone of `arch`; returns the provenance record. Never falls back silently."""
    spec = get_arch(arch)
    record: dict = {"init": init}
    if init == "scratch":
        record["description"] = "random initialisation (trained from scratch)"
    elif init == "imagenet":
        spec.imagenet_loader(backbone)
        record["description"] = "ImageNet-1k weights through the library's weights API"
    else:
        path = Path(init)
        if not path.is_file():
            raise InitError(f"--init {init}: no such file. Use 'scratch', 'imagenet' or an existing weights file.")
        state = _load_weight_file(path)
        head_prefixes = ("classifier.", "fc.", "head.")
        state = spec.remap_keys({k: v for k, v in state.items() if not k.startswith(head_prefixes)})
        try:
            load_torchvision_state(backbone, state)
        except (InitError, RuntimeError) as exc:
            raise InitError(f"--init {init}: weights do not fit {arch}: {exc}") from exc
        record.update(description=f"backbone weights from local file {path.name}", file=path.name,
                      file_sha256=file_sha256(path))
    return record


DEFAULT_TILES = {"backbone": "efficientnet_lite2", "pooling": "attention"}


def arch_spec(arch: str, arch_config: dict | None = None) -> ArchSpec:
    """The spec (preprocessing, stages, CAM layer) of `arch`; a composite takes its backbone's (a hybrid its CNN
    branch's, a tile model its backbone's with input size = one native tile)."""
    spec = get_arch(arch)
    return spec.spec_for(arch_config) if spec.spec_for else spec


def build_model(arch: str, init: str = "scratch", arch_config: dict | None = None,
                vit_init: str | None = None) -> tuple[nn.Module, dict]:
    """Build `arch` with an explicit init; returns the model and a provenance record for the card.

    For `hybrid`, `init` initialises the CNN branch and `vit_init` (None = from scratch, 'imagenet', or a
    local torchvision ViT checkpoint) the ViT branch; a `vit_init` makes the ViT branch a plain image ViT.
    """
    spec = get_arch(arch)
    if spec.builder:
        return spec.builder(init, arch_config, vit_init)
    backbone = spec.make_backbone()
    record = _init_backbone(arch, backbone, init)
    return HistoClassifier(backbone.float(), spec.feat_dim), record


def _tiles_spec(arch_config: dict | None) -> ArchSpec:
    from models.tiles import TILE_SIZE

    return replace(get_arch({**DEFAULT_TILES, **(arch_config or {})}["backbone"]), name="tiles", input_size=TILE_SIZE,
                   builder=_build_tiles, spec_for=_tiles_spec)


def _build_tiles(init: str, arch_config: dict | None, vit_init: str | None = None) -> tuple[nn.Module, dict]:
    """A frame as a bag of native tiles through one backbone (models.tiles)."""
    from models.tiles import TiledClassifier

    cfg = {**DEFAULT_TILES, **(arch_config or {})}
    spec = get_arch(cfg["backbone"])
    backbone = spec.make_backbone()
    record = _init_backbone(cfg["backbone"], backbone, init)
    model = TiledClassifier(backbone.float(), spec.feat_dim, cfg["pooling"])
    if cfg.get("subtype_head"):  # a subtype model: mean-pooled tiles -> 8 log-probabilities (models.subtype)
        from models.subtype import SUBTYPES, SubtypeHead

        if cfg["pooling"] != "mean" or list(cfg.get("classes") or []) != list(SUBTYPES):
            raise ValueError(f"a subtype head needs mean pooling and classes {list(SUBTYPES)} in that order")
        model.head = SubtypeHead(spec.feat_dim, cfg["subtype_head"])
    return model, record


def _ensemble_spec(arch_config: dict | None) -> ArchSpec:
    """A seed ensemble preprocesses as its members do; its CAM layer is each member's (models.gradcam reads all)."""
    member = arch_spec((arch_config or {}).get("member_arch", "efficientnet_lite2"), (arch_config or {}).get("member_config"))
    return replace(member, name="seed_ensemble", builder=_build_ensemble, spec_for=_ensemble_spec)


def _build_ensemble(init: str, arch_config: dict | None, vit_init: str | None = None) -> tuple[nn.Module, dict]:
    """K members of `member_arch` (weights: each member's own file, loaded by models.inference)."""
    from models.ensemble import SeedEnsemble

    cfg = arch_config or {}
    members = cfg.get("members") or []
    if not members or cfg.get("member_arch") in (None, "seed_ensemble"):
        raise ValueError("a seed_ensemble arch_config names member_arch and lists its members")
    built = [build_model(cfg["member_arch"], init, cfg.get("member_config"))[0] for _ in members]
    return SeedEnsemble(built), {"init": init, "description": f"{len(members)} members of {cfg['member_arch']}"}


def _hybrid_spec(arch_config: dict | None) -> ArchSpec:
    from models.hybrid import DEFAULT_HYBRID

    cnn = {**DEFAULT_HYBRID, **(arch_config or {})}["cnn"]
    return replace(get_arch(cnn), name="hybrid", builder=_build_hybrid, spec_for=_hybrid_spec)


def hybrid_config(arch_config: dict | None = None, vit_init: str | None = None) -> dict:
    """The full hybrid configuration stored in the card (defaults filled in)."""
    from models.hybrid import DEFAULT_HYBRID

    cfg = {**DEFAULT_HYBRID, **(arch_config or {})}
    if vit_init and cfg["vit"] == "hybrid":
        cfg["vit"] = "vit_b_16"  # a checkpoint is for a plain ViT: the branch reads the image instead of CNN tokens
    return cfg


def _build_hybrid(init: str, arch_config: dict | None, vit_init: str | None) -> tuple[nn.Module, dict]:
    import math

    from models.hybrid import HybridClassifier, ImageViT, TokenViT

    cfg = hybrid_config(arch_config, vit_init)
    cnn = cfg["cnn"]
    if cnn not in ARCHITECTURES:
        raise ValueError(f"unknown CNN branch {cnn!r}; choose from {sorted(ARCHITECTURES)}")
    spec = get_arch(cnn)
    backbone = spec.make_backbone()
    record = {"cnn_branch": _init_backbone(cnn, backbone, init)}
    record["init"] = init
    if cfg["vit"] == "hybrid":
        grid = (math.ceil(spec.input_size[0] / 32), math.ceil(spec.input_size[1] / 32))
        vit = TokenViT(spec.feat_dim, cfg["vit_dim"], cfg["vit_depth"], cfg["vit_heads"], grid)
        reads = "cnn"
        record["vit_branch"] = {"init": "scratch", "description": "hybrid ViT on CNN feature-map tokens, random "
                                "initialisation (no pretrained ViT is available here)"}
    else:
        vit = ImageViT(cfg["vit"])
        reads = "image"
        record["vit_branch"] = _init_vit(vit, cfg["vit"], vit_init)
    record["description"] = (f"CNN branch {cnn}: {record['cnn_branch']['description']}; ViT branch "
                             f"{cfg['vit']}: {record['vit_branch']['description']}; fusion and head from scratch")
    model = HybridClassifier(backbone.float(), spec.feat_dim, vit, reads, cfg["fusion_dim"], cfg["head_dim"],
                             cfg["dropout"], cfg["magnification_embedding"])
    return model, record


def _init_vit(vit: nn.Module, name: str, vit_init: str | None) -> dict:
    if not vit_init or vit_init == "scratch":
        return {"init": "scratch", "description": "random initialisation"}
    if vit_init == "imagenet":
        import torchvision.models as tvm

        enum = getattr(tvm, {"vit_b_16": "ViT_B_16_Weights", "vit_b_32": "ViT_B_32_Weights"}.get(name, ""), None)
        try:
            state = enum.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            raise InitError(f"--vit-init imagenet: torchvision could not provide {name} ImageNet weights "
                            f"({type(exc).__name__}). Pass a local checkpoint with --vit-init FILE or omit it "
                            "(hybrid ViT branch from scratch).") from exc
        desc = "ImageNet-1k weights through torchvision's weights API"
    else:
        path = Path(vit_init)
        if not path.is_file():
            raise InitError(f"--vit-init {vit_init}: no such file")
        state = _load_weight_file(path)
        desc = f"weights from local file {path.name}"
    state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    missing, unexpected = vit.vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InitError(f"--vit-init: checkpoint does not fit {name}: missing={missing[:5]} unexpected={unexpected[:5]}")
    rec = {"init": vit_init, "description": desc}
    if vit_init != "imagenet":
        rec.update(file=Path(vit_init).name, file_sha256=file_sha256(vit_init))
    return rec


# Composite architectures, registered like every other: their preprocessing comes from their backbone's spec.
register_arch(replace(_hybrid_spec(None), builder=_build_hybrid, spec_for=_hybrid_spec))
register_arch(replace(_tiles_spec(None), builder=_build_tiles, spec_for=_tiles_spec))
# A seed ensemble (models.ensemble) is a composite like the hybrid: not a backbone, registered after them.
register_arch(ArchSpec("seed_ensemble", 0, "", LITE_MEAN, LITE_STD, (230, 350), builder=_build_ensemble,
                       spec_for=_ensemble_spec))

