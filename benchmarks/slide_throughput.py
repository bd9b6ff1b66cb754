"""Tiles/s and peak memory of slide scoring (issue 26): the real CMU slide at 40X and a synthetic 10-gigapixel sparse
pyramid with a block of tissue, each in its own process (peak RSS is per process), the routed 40X model.

    python benchmarks/slide_throughput.py [--out benchmarks/results/slide_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, re, sys, time
sys.path.insert(0, {root!r})
from models.engine import load_predictor
from models.slide_score import score_slide
t0 = time.perf_counter()
pred = load_predictor("malignancy", "40X")
t1 = time.perf_counter()
run = score_slide({path!r}, pred, "malignancy", "40X", stride={stride})
t2 = time.perf_counter()
print(json.dumps({{"pixels": run.info.width * run.info.height, "levels": run.info.level_count,
                  "tiles": int(len(run.tiles)), "load_s": t1 - t0, "score_s": t2 - t1,
                  "tiles_per_s": len(run.tiles) / (t2 - t1),
                  "peak_rss_mb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024}}))
"""


def measure(path: Path, stride: float = 1.0) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path), stride=stride)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slide_throughput.json")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    from models.config import data_dir, shared_dir, software_version
    from tests.slide_fixtures import write_sparse_gigapixel

    res = {"cpus": os.cpu_count(), "software": software_version(), "model": "routed 40X model"}
    cmu = shared_dir() / "data" / "wsi" / "CMU-1-Small-Region.svs"
    res["cmu_40x"] = measure(cmu)
    res["cmu_40x_half_overlap"] = measure(cmu, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        frame = next((data_dir() / "40X").glob("*.jpg"))
        tissue = np.asarray(Image.open(frame).convert("RGB").resize((5600, 3680)))  # 4x4 fields of view at 40X
        giga = write_sparse_gigapixel(Path(tmp) / "giga.tif", 100_000, 0.25, tissue)
        res["sparse_10_gigapixel"] = measure(giga) | {"file_mb": giga.stat().st_size / 2**20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for k in ("cmu_40x", "cmu_40x_half_overlap", "sparse_10_gigapixel"):
        r = res[k]
        print(f"{k}: {r['pixels'] / 1e6:.0f} Mpx, {r['tiles']} tiles, {r['tiles_per_s']:.1f} tiles/s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
