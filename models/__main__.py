"""CLI: `python -m models COMMAND`; `--help` lists every command. A table of commands (models.cli_table), each a
small function pair (options, run) calling the engine (models.engine), so the CLI predicts exactly as the pages and
the batch pipeline do."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from models.card import MAGNIFICATIONS, TASK_KINDS, CardError, ModelCard, card_schema, metric
from models.cli_table import Command, run_table
from models.config import models_root


def _root_option(a: argparse.ArgumentParser) -> None:
    a.add_argument("--root", type=Path, default=None, help="models root (default magnif_models/)")


def _predict_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--task", choices=TASK_KINDS, default="malignancy",
                   help="malignancy: BreakHis frames (needs --magnification; adds subtype columns when a subtype model "
                        "is routed); idc: 50x50 IDC patches; subtype: the subtype model alone (its own benign/malignant head)")
    a.add_argument("--no-subtype", action="store_true", help="malignancy: leave out the subtype columns")
    a.add_argument("--magnification", choices=MAGNIFICATIONS, default=None)
    a.add_argument("--model", help="model id (e.g. 100X/efficientnet_lite2) under the root, or a model folder given as "
                                   "an absolute path or ./path; default: the routed one")
    _root_option(a)
    a.add_argument("--tta", action="store_true", help="average the 8 dihedral views (8x slower)")
    a.add_argument("files", nargs="*", help="image files (at least one)")


def _no_files(args) -> bool:
    if not args.files:
        print(f"error: no files given: python -m models {args.cmd} [options] FILE...", file=sys.stderr)
        return True
    return False


def _predict(args) -> int:
    """One CSV row per file on stdout, in order; a bad file is a row with its reason."""
    from models.engine import ServeError, load_predictor

    if _no_files(args):
        return 2
    try:
        pred = load_predictor(args.task, args.magnification if args.task != "idc" else None, model=args.model,
                              root=args.root, tta=args.tta, with_subtype=not args.no_subtype)
    except (ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from models.textsafe import csv_cell

    w = csv.DictWriter(sys.stdout, fieldnames=list(pred.csv_columns))
    w.writeheader()
    for r in pred.predict(args.files):  # text cells neutralised: a file named =cmd() stays text in a spreadsheet
        w.writerow({k: csv_cell(v) for k, v in pred.row(r).items()})
    return 0


def _case_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--magnification", choices=MAGNIFICATIONS, default=None,
                   help="for files whose names do not state it (BreakHis names do)")
    _root_option(a)
    a.add_argument("files", nargs="*", help="the case's frames (at least one)")


def _case(args) -> int:
    """Route each file by its magnification, predict with decisions, and print the case verdict as JSON."""
    from models.case import CaseFrame, case_verdict, resolve_magnification
    from models.engine import ServeError, load_predictor

    if _no_files(args):
        return 2
    by_mag: dict[str, list[int]] = {}
    frames = []
    for i, f in enumerate(args.files):
        mag, note = resolve_magnification(f, args.magnification)
        frames.append(CaseFrame(f, mag, note=note, reason="no magnification" if mag is None else ""))
        if mag:
            by_mag.setdefault(mag, []).append(i)
    models, loaded = {}, {}

    def loader(folder: Path):  # one load per model, however many magnifications it serves
        from models.inference import load_model_folder

        key = str(folder)
        if key not in loaded:
            loaded[key] = load_model_folder(folder)
        return loaded[key]

    for mag, idx in by_mag.items():
        try:
            pred = load_predictor("malignancy", mag, root=args.root, loader=loader)
        except ServeError as exc:
            if "Routing is unavailable" in str(exc) or "cannot load" in str(exc):
                print(f"error: {exc}", file=sys.stderr)
                return 2
            for i in idx:
                frames[i].reason = f"no model serves {mag}"
            continue
        models[pred.model_id] = pred.model
        for i, r in zip(idx, pred.predict([args.files[i] for i in idx])):
            fr = frames[i]
            fr.model_id, fr.p_malignant = pred.model_id, r.probability
            fr.decision, fr.reason = r.decision, r.reason or r.warning
            fr.kind, fr.content_sha256 = r.decision_kind, r.pixel_sha256
            fr.note = "; ".join(x for x in (fr.note, r.warning) if x)
    thresholds = {lm.card.threshold for lm in models.values()} or {0.5}
    # One case policy when one model judges the case (every magnification routed to it); several models' frames
    # have no jointly fitted policy, and the verdict then says the older CI rule applied.
    policies = {mid: lm.case_policy for mid, lm in models.items()}
    policy = next(iter(policies.values())) if len(policies) == 1 else None
    v = case_verdict(frames, threshold=thresholds.pop() if len(thresholds) == 1 else 0.5, policy=policy)
    figures = {mid: {k: (metric(lm.card.overall, k).value if metric(lm.card.overall, k) else None)
                     for k in ("patient_auc", "patient_accuracy", "auc")} for mid, lm in models.items()}
    print(json.dumps({**v.to_dict(), "models": sorted(models), "model_cv_figures": figures,
                      "disclaimer": "Research aid only, not a diagnosis."}, indent=1))
    return 0


def _batch_options(a: argparse.ArgumentParser) -> None:
    from models.batch import add_batch_options

    add_batch_options(a)


def _batch(args) -> int:
    from models.batch import run_batch_command

    return run_batch_command(args)


def _slide_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("slides", nargs="*", help="whole-slide files (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)")
    a.add_argument("--magnification", choices=MAGNIFICATIONS, default=None,
                   help="score fields of view at this BreakHis magnification's scale with its routed model")
    a.add_argument("--task", choices=["malignancy", "idc"], default="malignancy",
                   help="idc: 50x50 patches at the IDC model's scale (about 4 µm/px)")
    a.add_argument("--mpp", type=float, default=None, help="µm/px of level 0, for slides that do not state it")
    a.add_argument("--stride", type=float, default=1.0, help="tile step as a fraction of the tile (0.5: half overlap)")
    a.add_argument("--min-tissue", type=float, default=0.25, help="share of a tile that must be tissue in the mask")
    a.add_argument("--max-tiles", type=int, default=None, help="score at most this many tissue tiles per slide")
    a.add_argument("--model", default=None, help="model id under the root (default: the routed one)")
    _root_option(a)
    a.add_argument("--out", type=Path, required=True, help="folder for <slide>_tiles.csv, .geojson, _heatmap.png, "
                                                           "_summary.json")


def _slide(args) -> int:
    """Per slide: tiles CSV, GeoJSON, heatmap, summary; a bad slide is one line and the rest go on."""
    from tqdm import tqdm

    from models.engine import ServeError, load_predictor
    from models.slide import SlideError
    from models.slide_score import score_slide, write_outputs

    if not args.slides:
        print("error: no slides given: python -m models slide [options] SLIDE...", file=sys.stderr)
        return 2
    if args.task == "malignancy" and args.magnification is None:
        print("error: --magnification is required for --task malignancy (or use --task idc)", file=sys.stderr)
        return 2
    try:
        pred = load_predictor(args.task, args.magnification if args.task == "malignancy" else None, model=args.model,
                              root=args.root)
    except (ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.slides:
        bar = tqdm(desc=Path(path).name, unit="tile", file=sys.stderr, leave=False, delay=1.0)

        def progress(i: int, n: int) -> None:
            bar.total = n
            bar.update(i - bar.n)

        try:
            run = score_slide(path, pred, args.task, args.magnification, args.mpp, args.stride, args.min_tissue,
                              args.max_tiles, progress)
            paths = write_outputs(run, args.out)
        except SlideError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        finally:
            bar.close()
        t = run.summary["tiles"]
        print(f"{Path(path).name}: {t['scored']} tiles scored, {t['called']} called, {t['referred']} referred; "
              f"wrote {paths['summary'].parent}/{Path(path).stem}_*", file=sys.stderr)
    return 1 if failed == len(args.slides) else 0


def _card_schema_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--out", type=Path, default=None, help="default: <models root>/card.schema.json")


def _card_schema(args) -> int:
    out = args.out or models_root() / "card.schema.json"
    out.write_text(json.dumps(card_schema(), indent=1) + "\n")
    print(out)
    return 0


def _check_card_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("cards", nargs="+", type=Path)


def _check_card(args) -> int:
    bad = 0
    for c in args.cards:
        try:
            ModelCard.from_json(c / "card.json" if c.is_dir() else c)
            print(f"ok: {c}")
        except CardError as exc:
            bad += 1
            print(f"error: {exc}", file=sys.stderr)
    return 1 if bad else 0


COMMANDS = (
    Command("predict", "p(malignant) / p(IDC) / subtype per file, one CSV row each on stdout", _predict_options, _predict),
    Command("case", "judge the frames of one case together; JSON verdict on stdout", _case_options, _case),
    Command("batch", "score an archive (folder or manifest) on Ray into resumable Parquet", _batch_options, _batch),
    Command("slide", "score whole-slide images at a model's physical scale: tiles CSV, GeoJSON, heatmap, summary",
            _slide_options, _slide),
    Command("card-schema", "write the card's JSON Schema (magnif_models/card.schema.json)", _card_schema_options,
            _card_schema),
    Command("check-card", "validate card.json files; one line per refused card, exit 1 if any", _check_card_options,
            _check_card),
)


def main(argv: list[str] | None = None) -> int:
    return run_table("python -m models", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
