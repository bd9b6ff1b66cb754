"""CLI: python -m models predict --magnification 200X [--model ID] FILES... -> CSV on stdout; card-schema; check-card."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from models.card import MAGNIFICATIONS, CardError, ModelCard, card_schema
from models.config import lite2_init_hint, models_root
from models.inference import DefaultsError, default_model_id, load_model_folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="p(malignant) per file, one CSV row each")
    p.add_argument("--magnification", required=True, choices=MAGNIFICATIONS)
    p.add_argument("--model", help="model id (e.g. 100X/efficientnet_lite2) or a model folder; default: the registry's")
    p.add_argument("--root", type=Path, default=None, help="models root (default magnif_models/)")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral views (8x slower)")
    p.add_argument("files", nargs="+")
    s = sub.add_parser("card-schema", help="write the card's JSON Schema (magnif_models/card.schema.json)")
    s.add_argument("--out", type=Path, default=None, help="default: <models root>/card.schema.json")
    s = sub.add_parser("check-card", help="validate card.json files; one line per refused card, exit 1 if any")
    s.add_argument("cards", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "card-schema":
        out = args.out or models_root() / "card.schema.json"
        out.write_text(json.dumps(card_schema(), indent=1) + "\n")
        print(out)
        return 0
    if args.cmd == "check-card":
        bad = 0
        for c in args.cards:
            try:
                ModelCard.from_json(c / "card.json" if c.is_dir() else c)
                print(f"ok: {c}")
            except CardError as exc:
                bad += 1
                print(f"error: {exc}", file=sys.stderr)
        return 1 if bad else 0
    root = args.root or models_root()
    try:
        model_id = args.model or default_model_id(args.magnification, root)
    except DefaultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model_id is None:
        print(f"error: no model serves {args.magnification} in {root}; train one with "
              f"`python -m training train --data DATA --magnification {args.magnification} --arch efficientnet_lite2 "
              f"{lite2_init_hint()} --out {root}/{args.magnification}/efficientnet_lite2` "
              f"then `python -m training select-defaults --root {root}`", file=sys.stderr)
        return 2
    folder = Path(model_id) if Path(model_id, "card.json").is_file() else root / model_id
    try:
        lm = load_model_folder(folder)
    except Exception as exc:  # integrity or missing files: say so, no traceback
        print(f"error: cannot load model {model_id}: {exc}", file=sys.stderr)
        return 2
    rows = lm.predict_files(args.files, args.magnification, tta=args.tta)
    w = csv.DictWriter(sys.stdout, fieldnames=["path", "magnification", "model_id", "p_malignant", "label", "decision",
                                                "reason", "warning"])
    w.writeheader()
    for r in rows:
        r = dict(r)
        r["p_malignant"] = "" if r["p_malignant"] is None else repr(r["p_malignant"])
        w.writerow(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
