"""Training speed (issue 25 item 5): the depthwise layers' precision under CPU bf16 autocast is an implementation
detail of the step; it must not change what is trained or saved."""
import torch
from torch import nn

from models.archs import build_model
from training.engine import Compute, Fp32DepthwiseConv2d, depthwise_fp32

BF16_CPU = Compute(torch.device("cpu"), True, "test: bf16")
FP32_CPU = Compute(torch.device("cpu"), False, "test: fp32")


def _depthwise(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def test_depthwise_layers_run_in_fp32_under_bf16_autocast_and_are_plain_convs_afterwards():
    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite2", "scratch")
    keys = list(model.state_dict())
    dws = _depthwise(model)
    classes = [type(m) for m in dws]
    assert len(dws) > 10 and len(set(classes)) == 2  # nn.Conv2d and timm's Conv2dSame (the strided ones)
    with depthwise_fp32(model, BF16_CPU):
        assert all(isinstance(m, Fp32DepthwiseConv2d) and isinstance(m, c) for m, c in zip(dws, classes))
        assert list(model.state_dict()) == keys  # same parameters, same keys: the saved weights are unchanged
        for conv, cls in zip(dws, classes):
            x = torch.randn(2, conv.in_channels, 12, 12).bfloat16()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(x)
            # computed in fp32 from the bf16 input (the class's own padding), then handed on as bf16 like its neighbours
            ref = cls.forward(conv, x.float()).bfloat16()
            assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
        pointwise = next(m for m in model.modules() if type(m) is nn.Conv2d and m.groups == 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert pointwise(torch.randn(1, pointwise.in_channels, 4, 4)).dtype == torch.bfloat16  # still bf16
    assert [type(m) for m in dws] == classes  # restored


def test_without_cpu_bf16_nothing_is_swapped():
    model, _ = build_model("efficientnet_lite2", "scratch")
    with depthwise_fp32(model, FP32_CPU) as p:
        assert p.swapped == [] and not any(type(m) is Fp32DepthwiseConv2d for m in model.modules())
    with depthwise_fp32(model, Compute(torch.device("cuda"), True, "test: gpu")) as p:
        assert p.swapped == []
