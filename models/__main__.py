"""CLI: python -m models predict --magnification 200X [--model ID] FILES... -> CSV on stdout; card-schema; check-card."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from models.card import MAGNIFICATIONS, CardError, ModelCard, card_schema, metric
from models.config import lite2_init_hint, models_root
from models.inference import DefaultsError, default_model_id, load_model_folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="p(malignant) per file, one CSV row each")
    p.add_argument("--task", choices=["malignancy", "idc", "subtype"], default="malignancy",
                   help="malignancy: BreakHis frames (needs --magnification; adds subtype columns when a subtype model "
                        "is routed); idc: 50x50 IDC patches; subtype: the subtype model alone (its own benign/malignant head)")
    p.add_argument("--no-subtype", action="store_true", help="malignancy: leave out the subtype columns")
    p.add_argument("--magnification", choices=MAGNIFICATIONS, default=None)
    p.add_argument("--model", help="model id (e.g. 100X/efficientnet_lite2) or a model folder; default: the registry's")
    p.add_argument("--root", type=Path, default=None, help="models root (default magnif_models/)")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral views (8x slower)")
    p.add_argument("files", nargs="+")
    c = sub.add_parser("case", help="judge the frames of one case together; JSON on stdout")
    c.add_argument("--magnification", choices=MAGNIFICATIONS, default=None,
                   help="for files whose names do not state it (BreakHis names do)")
    c.add_argument("--root", type=Path, default=None)
    c.add_argument("files", nargs="+")
    s = sub.add_parser("card-schema", help="write the card's JSON Schema (magnif_models/card.schema.json)")
    s.add_argument("--out", type=Path, default=None, help="default: <models root>/card.schema.json")
    s = sub.add_parser("check-card", help="validate card.json files; one line per refused card, exit 1 if any")
    s.add_argument("cards", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "case":
        return _case(args)
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
    if args.task == "malignancy" and args.magnification is None:
        print("error: --magnification is required for --task malignancy (BreakHis frames)", file=sys.stderr)
        return 2
    try:
        model_id = args.model or default_model_id(args.magnification if args.task == "malignancy" else args.task, root)
        subtype_id = (default_model_id("subtype", root) if args.task == "malignancy" and not args.no_subtype else None)
    except DefaultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model_id is None and args.task == "subtype":
        print(f"error: no subtype model in {root}; train one with `python -m training train --task subtype --data "
              f"../shared/data/breakhis --out {root}/subtype/efficientnet_lite2_subtype` then `python -m training "
              f"select-defaults --root {root}`", file=sys.stderr)
        return 2
    if model_id is None and args.task == "idc":
        print(f"error: no IDC patch model in {root}; train one with `python -m training train-idc --data "
              f"../shared/data/idc --out {root}/idc/efficientnet_lite2_idc` then `python -m training select-defaults "
              f"--root {root}`", file=sys.stderr)
        return 2
    if model_id is None:
        print(f"error: no model serves {args.magnification} in {root}; train one with "
              f"`python -m training train --data DATA --magnification {args.magnification} --arch efficientnet_lite2 "
              f"{lite2_init_hint()} --out {root}/{args.magnification}/efficientnet_lite2` "
              f"then `python -m training select-defaults --root {root}`", file=sys.stderr)
        return 2
    try:
        lm = _load(model_id, root)
        slm = _load(subtype_id, root) if subtype_id else None
    except Exception as exc:  # integrity or missing files: say so, no traceback
        print(f"error: cannot load model {exc}", file=sys.stderr)
        return 2
    if args.task == "idc":
        return _predict_idc(lm, args.files)
    if args.task == "subtype":
        return _predict_subtype(lm, args.files)
    if lm.card.task_kind != "malignancy":
        print(f"error: {model_id} is a {lm.card.task_kind} model; use --task {lm.card.task_kind}", file=sys.stderr)
        return 2
    rows = lm.predict_files(args.files, args.magnification, tta=args.tta,
                            each=(lambda r, im: _add_subtype(slm, r, im)) if slm is not None else None)
    cols = ["path", "magnification", "model_id", "p_malignant", "label", "decision", "reason", "decision_kind", "warning"]
    if slm is not None:
        for r in rows:  # unreadable files never reach `each`
            r.setdefault("subtype", "")
            r.setdefault("p_subtype", "")
            r.setdefault("subtype_model_id", slm.model_id)
        cols[6:6] = ["subtype", "p_subtype", "subtype_model_id"]
    w = csv.DictWriter(sys.stdout, fieldnames=cols)
    w.writeheader()
    for r in rows:
        r = dict(r)
        r["p_malignant"] = "" if r["p_malignant"] is None else repr(r["p_malignant"])
        w.writerow(r)
    return 0


def _load(model_id: str, root: Path):
    folder = Path(model_id) if Path(model_id, "card.json").is_file() else root / model_id
    try:
        return load_model_folder(folder)
    except Exception as exc:
        raise RuntimeError(f"{model_id}: {exc}") from None


def _add_subtype(slm, r: dict, image) -> None:
    """subtype and p_subtype within the row's benign/malignant call (models.subtype.subtype_given_binary), from the
    image predict_files already decoded; empty where the frame was referred: a subtype is never given without a call."""
    from models.subtype import call_subtype, subtype_given_binary, subtype_probabilities

    r.update(subtype="", p_subtype="", subtype_model_id=slm.model_id)
    if r["p_malignant"] is None or r["decision"] not in ("benign", "malignant"):
        return
    ps = subtype_probabilities(slm, [image])[0]
    c = call_subtype(subtype_given_binary(ps, r["p_malignant"]), r["decision"] == "malignant")
    r["subtype"], r["p_subtype"] = c.subtype, repr(c.p_subtype)


def _predict_subtype(lm, files: list[str]) -> int:
    """path, task, model_id, subtype, p_subtype, p_malignant (the subtype model's own parent), top3, warning."""
    from models.preprocess import ImageError, load_image
    from models.quality import check_quality
    from models.subtype import BENIGN_SUBTYPES, call_subtype, subtype_probabilities

    if lm.card.task_kind != "subtype":
        print(f"error: {lm.model_id} is a {lm.card.task_kind} model, not a subtype model", file=sys.stderr)
        return 2
    w = csv.DictWriter(sys.stdout, fieldnames=["path", "task", "model_id", "subtype", "p_subtype", "p_malignant",
                                                "top3", "warning"])
    w.writeheader()
    for f in files:
        row = {"path": f, "task": "subtype", "model_id": lm.model_id, "subtype": "", "p_subtype": "",
               "p_malignant": "", "top3": "", "warning": ""}
        try:
            li = load_image(f, name=f)
        except ImageError as exc:
            row["warning"] = str(exc)
            w.writerow(row)
            continue
        notes = list(li.warnings) + check_quality(li.image).warnings  # no referral here: the QC warnings are said
        p = subtype_probabilities(lm, [li.image], [notes])[0]
        pm = float(p[len(BENIGN_SUBTYPES):].sum())
        c = call_subtype(p, pm >= 0.5)
        row.update(subtype=c.subtype, p_subtype=repr(c.p_subtype), p_malignant=repr(pm),
                   top3="; ".join(f"{s} {v:.3f}" for s, v in c.top3), warning="; ".join(notes))
        w.writerow(row)
    return 0


def _predict_idc(lm, files: list[str]) -> int:
    """path, task, model_id, p_idc, label, warning per patch (p_idc = probability of IDC-positive)."""
    from models.idc import predict_patches

    if lm.card.task_kind != "idc":
        print(f"error: {lm.model_id} is a {lm.card.task_kind} model, not an IDC patch model", file=sys.stderr)
        return 2
    w = csv.DictWriter(sys.stdout, fieldnames=["path", "task", "model_id", "p_idc", "label", "warning"])
    w.writeheader()
    for r in predict_patches(lm, [(f, f) for f in files]):
        w.writerow({"path": r.name, "task": "idc", "model_id": lm.model_id,
                    "p_idc": "" if r.p_idc is None else repr(r.p_idc), "label": r.label, "warning": r.warning})
    return 0


def _case(args) -> int:
    """Route each file by its magnification, predict with decisions, and print the case verdict as JSON."""
    from models.case import CaseFrame, case_verdict, resolve_magnification

    root = args.root or models_root()
    by_mag: dict[str, list[int]] = {}
    frames = []
    for i, f in enumerate(args.files):
        mag, note = resolve_magnification(f, args.magnification)
        frames.append(CaseFrame(f, mag, note=note, reason="no magnification" if mag is None else ""))
        if mag:
            by_mag.setdefault(mag, []).append(i)
    models = {}
    try:
        for mag, idx in by_mag.items():
            mid = default_model_id(mag, root)
            if mid is None:
                for i in idx:
                    frames[i].reason = f"no model serves {mag}"
                continue
            if mid not in models:
                models[mid] = load_model_folder(root / mid)
            lm = models[mid]
            for i, row in zip(idx, lm.predict_files([args.files[i] for i in idx], mag)):
                fr = frames[i]
                fr.model_id, fr.p_malignant = mid, row["p_malignant"]
                fr.decision, fr.reason = row["decision"], row["reason"] or row["warning"]
                fr.kind = row.get("decision_kind", "")
                fr.note = "; ".join(x for x in (fr.note, row["warning"]) if x)
    except (DefaultsError, CardError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    thresholds = {lm.card.threshold for lm in models.values()} or {0.5}
    # One case policy when one model judges the case (every magnification routed to it); several models' frames
    # have no jointly fitted policy, and the verdict then says the older CI rule applied.
    policies = {lm.model_id: lm.case_policy for lm in models.values()}
    policy = next(iter(policies.values())) if len(policies) == 1 else None
    v = case_verdict(frames, threshold=thresholds.pop() if len(thresholds) == 1 else 0.5, policy=policy)
    figures = {mid: {k: (metric(lm.card.overall, k).value if metric(lm.card.overall, k) else None)
                     for k in ("patient_auc", "patient_accuracy", "auc")} for mid, lm in models.items()}
    print(json.dumps({**v.to_dict(), "models": sorted(models), "model_cv_figures": figures,
                      "disclaimer": "Research aid only, not a diagnosis."}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
