import urllib.error

import pytest
import torch
from safetensors.torch import load_file

from models.archs import ARCHITECTURES, InitError, build_model
from tests.conftest import LITE2, needs_shared


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_with_binary_head(arch):
    model, rec = build_model(arch, "scratch")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 144))
    assert out.shape == (2,)
    assert rec["init"] == "scratch" and "scratch" in rec["description"]
    assert model.get_submodule(ARCHITECTURES[arch].cam_layer) is not None


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_imagenet_init_fails_clearly_without_weights(arch, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InitError, match="--init scratch"):
        build_model(arch, "imagenet")


def test_lite2_imagenet_names_the_local_file(monkeypatch):
    import timm

    def offline(*a, **k):
        if k.get("pretrained"):
            raise RuntimeError("hub unreachable")
        return orig(*a, **k)

    orig = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(InitError, match="efficientnet_lite2_in1k.safetensors"):
        build_model("efficientnet_lite2", "imagenet")


def test_missing_or_mismatched_init_file_is_an_error(tmp_path):
    with pytest.raises(InitError, match="no such file"):
        build_model("efficientnet_lite2", str(tmp_path / "nope.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InitError):
        build_model("resnet50", str(tmp_path / "wrong.safetensors"))


@needs_shared
def test_lite2_local_weights_load_exactly():
    model, rec = build_model("efficientnet_lite2", str(LITE2))
    ref = load_file(str(LITE2))
    assert torch.equal(model.backbone.conv_stem.weight, ref["conv_stem.weight"].float())
    assert rec["file_sha256"].startswith("4633c38a")
