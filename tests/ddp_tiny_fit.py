"""Train a tiny network for one epoch with training.engine.fit, alone or under torchrun (tests/test_distributed.py).

    python tests/ddp_tiny_fit.py --out single.pt
    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_tiny_fit.py --out ddp.pt

Synthetic frames (no data needed); rank 0 writes the trained state and the world size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--arch", choices=["tiny", "efficientnet_lite2"], default="tiny",
                    help="tiny: two convolutions, no BatchNorm or dropout (what DDP must reproduce exactly); "
                         "efficientnet_lite2: the real network (BatchNorm statistics are per process on CPU)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from models.archs import build_model
    from models.card import PreprocessConfig
    from training import distributed
    from training.engine import Compute, FitConfig, fit

    distributed.init_from_env("cpu")
    rng = np.random.default_rng(0)
    n = 40
    y = np.array([0, 1] * (n // 2))
    patients = np.array([f"p{i % 8}" for i in range(n)])
    images = torch.from_numpy(rng.integers(0, 255, (n, 3, 48, 72), dtype=np.uint8))
    images[y == 1, 0] = (images[y == 1, 0] // 2 + 100).to(torch.uint8)  # a little signal in the red channel
    cfg = PreprocessConfig(input_size=(48, 72), mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    if args.arch == "tiny":
        from models.archs import ARCHITECTURES, ArchSpec, HistoClassifier, register_arch

        if "tiny_ddp_test" not in ARCHITECTURES:  # ARCHITECTURES is the registry as it was at import
            ARCHITECTURES["tiny_ddp_test"] = register_arch(ArchSpec(
                name="tiny_ddp_test", feat_dim=16, cam_layer="backbone.2", mean=(0.5,) * 3, std=(0.25,) * 3,
                input_size=(48, 72), stages=lambda b: [b]))
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                       torch.nn.ReLU())
        model, arch = HistoClassifier(backbone, 16, dropout=0.0), "tiny_ddp_test"
    else:
        model, _ = build_model("efficientnet_lite2", "scratch")
        arch = "efficientnet_lite2"
    init = {k: v.clone() for k, v in model.state_dict().items()}
    fc = FitConfig(recipe="full", finetune_epochs=1, batch_size=args.batch_size, lr_full=1e-3, patience=5, seed=3,
                   balanced_sampling=True)
    train_idx, val_idx = np.arange(32), np.arange(32, n)
    res = fit(model, arch, images, None, y, patients, train_idx, val_idx, cfg, fc,
              Compute(torch.device("cpu"), False, "fp32 (test)"))
    rank, world = distributed.world()
    if rank == 0:
        torch.save({"state": res.state, "init": init, "world_size": world, "val_logits": res.val_logits}, args.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
