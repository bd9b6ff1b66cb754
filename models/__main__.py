"""CLI: python -m models predict --magnification 200X [--model ID] FILES... -> CSV on stdout."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from models.inference import MAGNIFICATIONS, default_model_id, load_model_folder, models_root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="p(malignant) per file, one CSV row each")
    p.add_argument("--magnification", required=True, choices=MAGNIFICATIONS)
    p.add_argument("--model", help="model id (e.g. 100X/efficientnet_lite2) or a model folder; default: the registry's")
    p.add_argument("--root", type=Path, default=None, help="models root (default magnif_models/)")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral views (8x slower)")
    p.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    root = args.root or models_root()
    model_id = args.model or default_model_id(args.magnification, root)
    if model_id is None:
        print(f"error: no model serves {args.magnification} in {root}; train one with "
              f"`python -m training train --data DATA --magnification {args.magnification} --arch efficientnet_lite2 "
              f"--init ../shared/weights/efficientnet_lite2_in1k.safetensors --out {root}/{args.magnification}/efficientnet_lite2` "
              f"then `python -m training select-defaults --root {root}`", file=sys.stderr)
        return 2
    folder = Path(model_id) if Path(model_id, "card.json").is_file() else root / model_id
    try:
        lm = load_model_folder(folder)
    except Exception as exc:  # integrity or missing files: say so, no traceback
        print(f"error: cannot load model {model_id}: {exc}", file=sys.stderr)
        return 2
    rows = lm.predict_files(args.files, args.magnification, tta=args.tta)
    w = csv.DictWriter(sys.stdout, fieldnames=["path", "magnification", "model_id", "p_malignant", "label", "warning"])
    w.writeheader()
    for r in rows:
        r = dict(r)
        r["p_malignant"] = "" if r["p_malignant"] is None else repr(r["p_malignant"])
        w.writerow(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
