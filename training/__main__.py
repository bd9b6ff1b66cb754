"""CLI: `python -m training COMMAND`; `--help` lists every command. A table of commands (models.cli_table): each
command is an options function and a run function below."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.archs import list_archs
from models.card import ALL, MAGNIFICATIONS, metric
from models.cli_table import Command, build_parser


def _write_result(res: dict, out: Path) -> None:
    """A command's results JSON, with the command line that produced it."""
    res["command"] = "python -m training " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


def _fmt(m) -> str:
    return "n/a" if m is None else f"{m.value:.3f} (95% CI {m.ci95[0]:.3f}-{m.ci95[1]:.3f})"


def _card_line(card) -> str:
    """The one-line summary every training command prints."""
    return (f"{card.model_id}: AUC {_fmt(metric(card.overall))}; patients {card.overall.get('n_patients')}; "
            f"{card.training_time_s:.0f}s")


def _options_index(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--out", help="write the index as CSV")


def _options_fetch_breakhis(a: argparse.ArgumentParser) -> None:
    a.add_argument("--to", required=True)
    a.add_argument("--url", default=None)


def _options_split(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--scheme", choices=["holdout", "kfold", "lopo"], default="kfold")
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True)


def _options_train(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--task", choices=["malignancy", "subtype"], default="malignancy",
                   help="subtype: the eight BreakHis subtypes (frozen Lite2 native tiles + flat or hierarchical heads)")
    a.add_argument("--strategy", choices=["flat", "hierarchical"], default="hierarchical", help="subtype: the heads")
    a.add_argument("--parent-model", default=None,
                   help="subtype: the routed malignancy model folder, to measure the subtype within its call as "
                        "Diagnose shows it (its out-of-fold predictions.csv)")
    a.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2], help="subtype: CV split seeds")
    a.add_argument("--magnification", default=None, choices=[*MAGNIFICATIONS, ALL],
                   help="required for --task malignancy; subtype default: all")
    a.add_argument("--arch", default=None, choices=[n for n in list_archs() if n != "tiles"],
                   help="a registered architecture (models.archs.register_arch); tile models: train-tiles; "
                        "required for --task malignancy")
    a.add_argument("--init", default=None, help="imagenet | scratch | path to .safetensors/.pth (hybrid: CNN branch); "
                   "required for --task malignancy; subtype: the Lite2 ImageNet weights file (default ../shared/weights)")
    a.add_argument("--cnn", default="efficientnet_lite2", choices=list_archs(backbones_only=True), help="hybrid: CNN branch")
    a.add_argument("--vit", default="hybrid", help="hybrid: ViT branch ('hybrid' = ViT on CNN tokens | vit_b_16)")
    a.add_argument("--vit-init", default=None, help="hybrid: imagenet | local ViT checkpoint (makes the branch a plain ViT)")
    a.add_argument("--p1-epochs", type=int, default=30, help="hybrid phase 1 (CNN frozen) max epochs")
    a.add_argument("--p2-epochs", type=int, default=2, help="hybrid phase 2 (last CNN stages) epochs")
    a.add_argument("--p3-epochs", type=int, default=1, help="hybrid phase 3 (everything) epochs")
    a.add_argument("--stain", choices=["none", "reinhard", "macenko"], default="none",
                   help="stain normalisation (targets fitted on the training frames, stored in the card)")
    a.add_argument("--tta-eval", action="store_true", help="also score out-of-fold predictions with 8-view TTA")
    a.add_argument("--no-cross-magnification", action="store_true",
                   help="skip predicting other magnifications' frames of held-out patients")
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--cv-only", action="store_true",
                   help="write the out-of-fold evaluation only, no final model (a rule-1 repeat; needs --cv > 1)")
    a.add_argument("--recipe", choices=["logreg", "linear", "finetune", "full"], default=None,
                   help="default: finetune for pretrained init, full for scratch")
    a.add_argument("--cv", type=int, default=5, help="outer grouped folds; 0 = single train/val/test split")
    a.add_argument("--head-epochs", type=int, default=60)
    a.add_argument("--epochs", type=int, default=4, help="fine-tuning / full-training epochs")
    a.add_argument("--finetune-stages", type=int, default=2)
    a.add_argument("--lr", type=float, default=None,
                   help="learning rate of the trained stages (default: 1e-3 full / 1e-4 finetune)")
    a.add_argument("--colour-aug", choices=["mild", "hed"], default="mild",
                   help="colour augmentation in fine-tuning: mild jitter, or HED stain + strong HSV jitter (Tellez 2019)")
    a.add_argument("--balanced-sampling", action="store_true",
                   help="draw training frames by class/patient weight (unweighted loss) instead of weighting the loss")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--patience", type=int, default=3)
    a.add_argument("--seed", type=int, default=0, help="split seed (folds, inner splits); also the training seed "
                   "unless --train-seed is given")
    a.add_argument("--train-seed", type=int, default=None,
                   help="training seed (network init, data order, augmentation) on the folds of --seed: repeats a "
                        "from-scratch recipe over training seeds on fixed folds (default: --seed)")
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--cache-dir", type=Path, default=None)
    a.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    a.add_argument("--limitation", action="append", default=[])


def _options_evaluate(a: argparse.ArgumentParser) -> None:
    a.add_argument("--model", required=True)
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=None)
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--tta", action="store_true", help="8-view dihedral test-time augmentation")
    a.add_argument("--out", type=Path, help="write metrics JSON and predictions CSV with this stem")


def _options_leakage_demo(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default="100X", choices=MAGNIFICATIONS)
    a.add_argument("--out", type=Path)


def _options_rescore(a: argparse.ArgumentParser) -> None:
    a.add_argument("models", nargs="+")
    a.add_argument("--n-boot", type=int, default=1000)


def _options_pick_recipe(a: argparse.ArgumentParser) -> None:
    a.add_argument("--candidates", nargs="+", required=True)
    a.add_argument("--out", required=True)


def _options_frozen_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--weights", default=None, help="Lite2 ImageNet weights file (default: BREAKHIS_LITE2_WEIGHTS or ../shared/weights)")
    a.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--recipes", nargs="+", default=None)
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--out", type=Path, required=True)


def _options_repeats_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--weights", default=None)
    a.add_argument("--runs", nargs="+", type=Path, required=True, help="model folders of the same recipe, one per (--seed, --train-seed)")
    a.add_argument("--name", default=None, help="the recipe's name in the tables (default: the first run's model_id)")
    a.add_argument("--incumbent-runs", nargs="+", type=Path, default=None,
                   help="the routed incumbent recipe's runs on the same split seeds: adds the paired AUC difference")
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--seed-ensemble", action="store_true",
                   help="the runs are a seed ensemble: each split seed's runs averaged (every run a member)")
    a.add_argument("--out", type=Path, required=True)


def _options_scale_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--weights", default=None)
    a.add_argument("--scales", type=float, nargs="+", default=[0.7, 0.85, 1.0, 1.2, 1.4])
    a.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--out", type=Path, required=True)


def _options_subtype_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--weights", default=None)
    a.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--n-boot", type=int, default=500)
    a.add_argument("--parent-model", default=None, help="the routed malignancy model folder: adds the subtype within "
                   "its out-of-fold call, as Diagnose shows it")
    a.add_argument("--out", type=Path, required=True)


def _options_idc_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True, help="an IDC folder: manifest.csv, flat patch names, or <patient>/<0|1>/")
    a.add_argument("--weights", default=None)
    a.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    a.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--out", type=Path, required=True)


def _options_train_idc(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--weights", default=None)
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--arch", default="efficientnet_lite2", choices=list_archs(backbones_only=True),
                   help="backbone (frozen); e.g. efficientnet_v2_s, the published IDC system's, with --weights FILE|imagenet")
    a.add_argument("--n-boot", type=int, default=1000)


def _options_distill_resnet50(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--idc", default=None, help="IDC patch folder to distil on as well")
    a.add_argument("--weights", default=None)
    a.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    a.add_argument("--out", type=Path, required=True, help="student weights (.safetensors; a .json record beside)")
    a.add_argument("--eval-out", type=Path, default=None, help="rule-1 comparison JSON")
    a.add_argument("--n-boot", type=int, default=1000)


def _options_idc_finetune_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--weights", default=None, help="ImageNet Lite2 weights file (default: the configured one)")
    a.add_argument("--size", type=int, default=112)
    a.add_argument("--epochs", type=int, default=4)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--save-backbone", default=None, help="also refit on every patient and save the backbone here")
    a.add_argument("--also-frozen-size", type=int, default=None,
                   help="afterwards, also compare against the frozen recipe at this input size on the same folds")
    a.add_argument("--ship-to", default=None, help="where the fine-tuned model beats the frozen one by the paired "
                                                   "rule, write the refit model folder here (it is then routed)")
    a.add_argument("--out", required=True)


def _options_served_policy_gap(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)


def _options_calibrate_magnifications(a: argparse.ArgumentParser) -> None:
    a.add_argument("--model", required=True)


def _options_build_ensemble(a: argparse.ArgumentParser) -> None:
    a.add_argument("--runs", nargs="+", required=True, help="model folders of the runs (same folds, other --train-seed)")
    a.add_argument("--out", required=True)
    a.add_argument("--model-id", default=None)
    a.add_argument("--rule1-out", default=None, help="also write its rule-1 record (repeats-cv layout) here")


def _options_fit_refer(a: argparse.ArgumentParser) -> None:
    a.add_argument("--model", required=True, type=Path)
    a.add_argument("--idc", default=None, help="IDC patch folder (other-scale histology for the OOD AUROC)")
    a.add_argument("--target-accuracy", type=float, default=0.85)
    a.add_argument("--quantile", type=float, default=0.99)


def _options_train_tiles(a: argparse.ArgumentParser) -> None:
    a.add_argument("--data", required=True)
    a.add_argument("--magnification", default=ALL, choices=[*MAGNIFICATIONS, ALL])
    a.add_argument("--weights", default=None, help="Lite2 ImageNet weights file (default: ../shared/weights)")
    a.add_argument("--pooling", choices=["attention", "mean"], default="attention")
    a.add_argument("--cv", type=int, default=5)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--out", type=Path, required=True)


def _options_select_defaults(a: argparse.ArgumentParser) -> None:
    a.add_argument("--root", default="magnif_models")


def _run_index(args) -> int:
    from training.data import index_source

    res = index_source(args.data)
    print(res.summary())
    if args.out:
        res.frame.to_csv(args.out, index=False)
    return 0


def _run_fetch_breakhis(args) -> int:
    from training.data import OFFICIAL_URL, fetch_breakhis

    print(fetch_breakhis(args.to, args.url or OFFICIAL_URL))
    return 0


def _run_split(args) -> int:
    from training.data import index_source
    from training.splits import grouped_kfold, leave_one_patient_out, patient_split, write_split_csv
    from training.train import select_rows

    df = select_rows(index_source(args.data), args.magnification)
    if args.scheme == "holdout":
        df["part"] = patient_split(df, seed=args.seed)
    elif args.scheme == "kfold":
        df["part"] = grouped_kfold(df, args.k, args.seed)
    else:
        df["part"] = leave_one_patient_out(df)
    write_split_csv(df, args.out, ["part"])
    print(df.groupby(["part", "label"])["patient"].nunique().to_string())
    return 0


def _run_train(args) -> int:
    if args.task == "subtype":
        from training.subtypes import train_subtype_model
        from training.train import BASELINE_WEIGHTS

        if args.arch not in (None, "efficientnet_lite2"):
            print("error: --task subtype uses the frozen Lite2 tile recipe; --arch does not apply", file=sys.stderr)
            return 2
        card = train_subtype_model(args.data, args.out, args.init or str(BASELINE_WEIGHTS), args.strategy,
                                   args.magnification or ALL, tuple(args.split_seeds), args.cv, args.n_boot,
                                   args.parent_model, args.cache_dir)
        ba = card.evaluation["subtype_cv"]["results"][args.strategy]["metrics"]["balanced_accuracy"]
        print(f"{card.model_id}: {args.strategy} subtype model, patient-grouped balanced accuracy {ba['value']:.3f} "
              f"({ba['ci95'][0]:.3f}-{ba['ci95'][1]:.3f}); wrote {args.out}")
        return 0
    from training.engine import FitConfig
    from training.train import run_train

    missing = [f"--{n}" for n in ("magnification", "arch", "init") if getattr(args, n) is None]
    if missing:
        print(f"error: --task malignancy needs {' '.join(missing)}", file=sys.stderr)
        return 2

    if args.cv_only and not (args.cv and args.cv > 1):
        print("error: --cv-only needs --cv > 1 (its figures are the out-of-fold predictions)", file=sys.stderr)
        return 2
    recipe = args.recipe or ("full" if args.init == "scratch" else "finetune")
    train_seed = args.seed if args.train_seed is None else args.train_seed
    fc = FitConfig(recipe=recipe, head_epochs=args.head_epochs, finetune_epochs=args.epochs,
                   finetune_stages=args.finetune_stages, batch_size=args.batch_size, patience=args.patience,
                   seed=train_seed, colour_augmentation=args.colour_aug, balanced_sampling=args.balanced_sampling,
                   **({"lr_full": args.lr, "lr_finetune": args.lr} if args.lr else {}))
    from training.hybrid import HybridConfig

    hc = HybridConfig(p1_epochs=args.p1_epochs, p2_epochs=args.p2_epochs, p3_epochs=args.p3_epochs,
                      batch_size=args.batch_size, seed=train_seed)
    from training import distributed
    from training.engine import select_compute

    distributed.init_from_env(str(select_compute(args.fp32).device))  # under torchrun: DDP; else nothing
    card = run_train(args.data, args.magnification, args.arch, args.init, args.out, fc, cv=args.cv, seed=args.seed,
                     n_boot=args.n_boot, cache_dir=args.cache_dir, force_fp32=args.fp32, limitations=args.limitation,
                     arch_config={"cnn": args.cnn, "vit": args.vit}, vit_init=args.vit_init, stain=args.stain,
                     eval_tta=args.tta_eval, hc=hc, cross_magnification=not args.no_cross_magnification,
                     train_seed=train_seed, refit_final=not args.cv_only)
    if card is not None:  # rank 0 (or a plain run) wrote the folder
        print(_card_line(card) + f"; baseline AUC {_fmt(metric(card.baseline.get('overall')))}")
    distributed.shutdown()
    return 0


def _run_evaluate(args) -> int:
    from training.evaluate import evaluate_model

    res, held = evaluate_model(args.model, args.data, args.magnification, args.n_boot, tta=args.tta)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(res, indent=1))
        held.to_csv(f"{args.out}.csv", index=False)
    m = res["metrics"]
    print(json.dumps({k: m[k] for k in m}, indent=1))
    print(f"patients: {res['n_patients']}  images: {res['n_images']}")
    return 0


def _run_leakage_demo(args) -> int:
    from training.evaluate import leakage_demo

    res = leakage_demo(args.data, args.magnification)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


def _run_rescore(args) -> int:
    from training.train import rescore

    for mdir in args.models:
        c = rescore(mdir, args.n_boot)
        print(f"{mdir}: " + _card_line(c))
    return 0


def _run_pick_recipe(args) -> int:
    from training.evaluate import pick_better

    sel = pick_better(args.candidates, args.out)
    for r in sel["candidates"]:
        print(f"{r['recipe']:10s} stain {r['stain']:8s} AUC {r['auc']:.3f} ({r['auc_ci95'][0]:.3f}-{r['auc_ci95'][1]:.3f})  {r['candidate']}")
    print(f"shipped: {sel['chosen']} -> {args.out}")
    return 0


def _run_repeats_cv(args) -> int:
    from training.data import default_cache_dir, index_source
    from training.frozen_cv import frozen_features, trained_runs_cv
    from training.train import BASELINE_WEIGHTS, select_rows

    df = select_rows(index_source(args.data), args.magnification)
    whole, tiles = frozen_features(df["path"].tolist(), args.weights or str(BASELINE_WEIGHTS), default_cache_dir())
    res = trained_runs_cv(df, args.runs, whole, tiles, args.n_boot, args.k, args.incumbent_runs, args.seed_ensemble)
    if args.name:
        res["model_id"] = args.name
    _write_result(res, args.out)
    r = res["recipe"]
    print(f"{res['model_id']} over seeds {res['seeds']}: per-fold AUC {r['per_fold_auc_mean']:.3f} ± "
          f"{r['per_fold_auc_sd']:.3f}; pooled by seed {[round(a, 3) for a in r['pooled_auc_by_seed']]}; seed-averaged "
          f"AUC {r['summary']['auc']['value']:.3f}; vs whole LR {r['vs_whole_lr']['difference']:+.3f} "
          f"({r['vs_whole_lr']['ci95'][0]:+.3f} to {r['vs_whole_lr']['ci95'][1]:+.3f}); vs tile-mean LR "
          f"{r['vs_tiles_mean_lr']['difference']:+.3f} ({r['vs_tiles_mean_lr']['ci95'][0]:+.3f} to "
          f"{r['vs_tiles_mean_lr']['ci95'][1]:+.3f})")
    if "vs_incumbent" in r:
        v = r["vs_incumbent"]
        print(f"  vs the incumbent {v['incumbent']}: {v['difference']:+.3f} ({v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f})")
    for ss, t in res["training_seed_spread"].items():
        print(f"  split seed {ss}, training seeds {t['train_seeds']}: pooled AUC "
              f"{[round(x, 3) for x in t['pooled_auc']]} (sd {t['sd']:.3f})")
    return 0


def _run_frozen_cv(args) -> int:
    from training.data import default_cache_dir
    from training.frozen_cv import RECIPES, frozen_features, repeated_cv
    from training.train import BASELINE_WEIGHTS, select_rows

    weights = args.weights or str(BASELINE_WEIGHTS)
    from training.data import index_source

    df = select_rows(index_source(args.data), args.magnification)
    whole, tiles = frozen_features(df["path"].tolist(), weights, default_cache_dir())
    res = repeated_cv(df, whole, tiles, args.recipes or RECIPES, tuple(args.split_seeds), args.k, args.n_boot)
    _write_result(res, args.out)
    for r, v in res["recipes"].items():
        a_ = v["summary"]["auc"]
        print(f"{r:28s} per-fold AUC {v['per_fold_auc_mean']:.3f}±{v['per_fold_auc_sd']:.3f}  pooled {a_['value']:.3f} "
              f"({a_['ci95'][0]:.3f}-{a_['ci95'][1]:.3f})  patient AUC {v['summary']['patient_auc']['value']:.3f}")
    return 0


def _run_scale_cv(args) -> int:
    from training.data import default_cache_dir, index_source
    from training.frozen_cv import scale_shift_cv, scaled_tile_means
    from training.train import BASELINE_WEIGHTS, select_rows

    df = select_rows(index_source(args.data), args.magnification)
    scales = tuple(args.scales)
    if 1.0 not in scales:
        raise ValueError("--scales must include 1.0 (the training scale)")
    means = scaled_tile_means(df["path"].tolist(), args.weights or str(BASELINE_WEIGHTS), scales, default_cache_dir())
    res = scale_shift_cv(df, means, scales, tuple(args.split_seeds), n_boot=args.n_boot)
    _write_result(res, args.out)
    for sc, row in res["by_test_scale"].items():
        d = row["scale_aug_minus_plain"]
        print(f"test scale {sc}: plain AUC {row['plain']['value']:.3f}  scale-augmented {row['scale_aug']['value']:.3f}"
              f"  difference {d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    return 0


def _run_subtype_cv(args) -> int:
    from training.data import default_cache_dir, index_source
    from training.frozen_cv import frozen_features
    from training.subtypes import markdown_tables, routed_parent, subtype_cv
    from training.train import BASELINE_WEIGHTS, select_rows

    df = select_rows(index_source(args.data), args.magnification)
    _, tiles = frozen_features(df["path"].tolist(), args.weights or str(BASELINE_WEIGHTS), default_cache_dir())
    parent = routed_parent(df, args.parent_model) if args.parent_model else None
    res = subtype_cv(df, tiles.mean(1), split_seeds=tuple(args.split_seeds), k=args.k, n_boot=args.n_boot,
                     parent=parent)
    _write_result(res, args.out)
    print(markdown_tables(res))
    return 0


def _run_idc_cv(args) -> int:
    from training.data import default_cache_dir
    from training.idc import idc_cv, index_idc, markdown_table, patch_features
    from training.train import BASELINE_WEIGHTS

    df = index_idc(args.data)
    feats = {s: patch_features(df["path"].tolist(), args.weights or str(BASELINE_WEIGHTS), s, default_cache_dir())
             for s in args.sizes}
    res = idc_cv(df, feats, tuple(args.split_seeds), args.k, args.n_boot)
    _write_result(res, args.out)
    print(markdown_table(res))
    return 0


def _run_train_idc(args) -> int:
    from training.idc import train_idc_model
    from training.train import BASELINE_WEIGHTS

    if args.arch != "efficientnet_lite2" and not args.weights:
        print(f"error: --arch {args.arch} needs --weights FILE or imagenet (only Lite2 ImageNet weights ship here; "
              "never a silent random backbone)", file=sys.stderr)
        return 2
    card = train_idc_model(args.data, args.out, args.weights or str(BASELINE_WEIGHTS), args.size, n_boot=args.n_boot,
                           arch=args.arch)
    a_ = card.metric_at("40X")
    print(f"{card.model_id}: patch AUC {a_.value:.3f} ({a_.ci95[0]:.3f}-{a_.ci95[1]:.3f}), temperature "
          f"{card.temperature:.2f}; wrote {args.out}")
    return 0


def _run_distill_resnet50(args) -> int:
    from training.data import default_cache_dir, index_source
    from training.distill import breakhis_tiles, distill, idc_pixels, save_student, student_tile_means
    from training.frozen_cv import feature_sets_cv, frozen_features
    from training.train import BASELINE_WEIGHTS, select_rows

    weights = args.weights or str(BASELINE_WEIGHTS)
    df = select_rows(index_source(args.data), ALL)
    paths = df["path"].tolist()
    _, teacher = frozen_features(paths, weights, default_cache_dir())
    tiles_u8 = breakhis_tiles(paths)
    sets = [(tiles_u8, teacher.reshape(-1, teacher.shape[-1]))]
    n_idc = 0
    if args.idc:
        from training.idc import index_idc, patch_features

        idf = index_idc(args.idc)
        sets.append((idc_pixels(idf["path"].tolist()), patch_features(idf["path"].tolist(), weights, 224,
                                                                     default_cache_dir())))
        n_idc = len(idf)
    m, rec = distill(sets, args.minutes)
    rec.update(teacher=f"frozen ImageNet Lite2 ({weights})", breakhis_tiles=int(len(tiles_u8)), idc_patches=n_idc,
               labels_used="none (BreakHis frames of every CV fold, test patients included, are seen unlabelled)",
               command="python -m training " + " ".join(sys.argv[1:]))
    save_student(m, args.out, rec)
    print(json.dumps({k: rec[k] for k in ("steps", "epochs", "minutes", "loss_by_quarter", "compute")}))
    if args.eval_out:
        res = feature_sets_cv(df, {"lite2_tiles_mean": teacher.mean(1),
                                   "resnet50_distilled_tiles_mean": student_tile_means(m, tiles_u8, len(df))},
                              "lite2_tiles_mean", n_boot=args.n_boot)
        res["student"] = rec
        res["command"] = rec["command"]
        args.eval_out.parent.mkdir(parents=True, exist_ok=True)
        args.eval_out.write_text(json.dumps(res, indent=1) + "\n")
        for n, v in res["sets"].items():
            a_ = v["summary"]["auc"]
            d = v["vs_reference"]
            print(f"{n:32s} frame AUC {a_['value']:.3f} ({a_['ci95'][0]:.3f}-{a_['ci95'][1]:.3f}) patient AUC "
                  f"{v['summary']['patient_auc']['value']:.3f}" + (f"  vs Lite2 {d['difference']:+.3f} "
                  f"({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d else ""))
    return 0


def _run_idc_finetune_cv(args) -> int:
    from models.config import lite2_weights
    from training.idc_finetune import idc_finetune_cv

    res = idc_finetune_cv(args.data, args.weights or str(lite2_weights()), args.size, seed=args.seed,
                          epochs=args.epochs, save_backbone=Path(args.save_backbone) if args.save_backbone else None,
                          ship_to=Path(args.ship_to) if args.ship_to else None)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    if args.also_frozen_size:
        from training.idc_finetune import compare_to_frozen_at

        compare_to_frozen_at(args.out, args.data, args.weights or str(lite2_weights()), args.also_frozen_size)
    d = res["fine_tuned_minus_frozen"]
    print(f"fine-tuned AUC {res['fine_tuned']['auc']['value']:.3f} vs frozen {res['frozen']['auc']['value']:.3f}: "
          f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}); routes: {res['routes']}")
    return 0


def _run_served_policy_gap(args) -> int:
    import pandas as pd

    from training.case_policy import served_model_gap
    from training.train import baseline_features, load_training_set
    from training.engine import select_compute, quality_table
    from training.data import default_cache_dir
    from models.card import PreprocessConfig
    from models.archs import arch_spec

    spec = arch_spec("efficientnet_lite2")
    cfg = PreprocessConfig(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    ts, _, _ = load_training_set(args.data, ALL, cfg, select_compute(), default_cache_dir())
    feats = baseline_features(ts, None)
    qc = quality_table(ts.df["path"].tolist())
    frames = pd.DataFrame({"patient": ts.patients, "y": ts.y, "magnification": ts.df["magnification"].to_numpy(),
                           "qc_ok": qc["qc_pass"].to_numpy(bool)})
    res = served_model_gap(frames, feats)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for name in ("fold_model", "served_model"):
        v = res[name]["6"]
        print(f"{name}: cases of 6 called {v['coverage']['value']:.0%} ({v['coverage']['ci95'][0]:.0%}-"
              f"{v['coverage']['ci95'][1]:.0%}), right {v['accuracy']['value']:.0%} ({v['accuracy']['ci95'][0]:.0%}-"
              f"{v['accuracy']['ci95'][1]:.0%})")
    return 0


def _run_calibrate_magnifications(args) -> int:
    from training.refer import calibrate_magnifications

    print(json.dumps(calibrate_magnifications(args.model), indent=1))
    return 0


def _run_build_ensemble(args) -> int:
    from training.ensemble import build_ensemble

    print(json.dumps(build_ensemble(args.runs, args.out, args.model_id), indent=1))
    if args.rule1_out:
        from training.ensemble import rule1_record

        rule1_record(args.out, args.rule1_out)
    return 0


def _run_fit_refer(args) -> int:
    from training.refer import fit_refer

    pol = fit_refer(args.model, args.idc, args.target_accuracy, args.quantile)
    print(json.dumps({k: pol[k] for k in ("band", "target_accuracy", "accepted_accuracy", "coverage", "ood_auroc",
                                          "notes")}, indent=1))
    return 0


def _run_train_tiles(args) -> int:
    from training.frozen_cv import train_tile_model
    from training.train import BASELINE_WEIGHTS

    card = train_tile_model(args.data, args.out, args.weights or str(BASELINE_WEIGHTS), args.magnification,
                            args.pooling, args.cv, args.seed, args.n_boot)
    print(_card_line(card))
    return 0


def _run_select_defaults(args) -> int:
    from models.routing.rule import select_defaults

    for mag, d in select_defaults(args.root).items():
        fig = (f"AUC {d['auc']:.3f}" if "auc" in d else f"balanced accuracy {d['balanced_accuracy']:.3f}")
        print(f"{mag}: {d['model_id']} {fig} ({d['kind']}): {d['reason']}")
        for r in d.get("comparisons", []):
            if r["difference"] is not None:
                print(f"    {r['challenger']:28s} vs {d['incumbent']}: {r['difference']:+.3f} "
                      f"(95% CI {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}){' same folds' if r['same_folds'] else ''}")
    return 0


def _options_paired_runs(a: argparse.ArgumentParser) -> None:
    a.add_argument("--challenger", required=True, type=Path, help="run folder with the change")
    a.add_argument("--incumbent", required=True, type=Path, help="run folder of the recipe as it is")
    a.add_argument("--what", default="", help="what differs between the runs, for the record")
    a.add_argument("--out", required=True, type=Path)


def _run_paired_runs(args) -> int:
    from training.compare import write_paired_runs

    r = write_paired_runs(args.challenger, args.incumbent, args.out, args.what)
    d = r["pooled"]
    print(f"{args.challenger} vs {args.incumbent}: AUC {d['auc_challenger']:.3f} vs {d['auc_incumbent']:.3f}, "
          f"difference {d['difference']:+.3f} (paired 95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}); "
          f"{'adopted' if r['adopted'] else 'not adopted'} by the paired rule; wrote {args.out}")
    return 0


def _options_threshold_cv(a: argparse.ArgumentParser) -> None:
    a.add_argument("--model", required=True, type=Path, help="a pooled model folder (its predictions.csv)")
    a.add_argument("--out", required=True, type=Path)


def _run_threshold_cv(args) -> int:
    from training.thresholds import write_threshold_cv

    r = write_threshold_cv(args.model, args.out)
    print(f"balanced accuracy, held-out patients: single threshold {r['balanced_accuracy_single_threshold']:.3f}, "
          f"per magnification {r['balanced_accuracy_per_magnification']:.3f}, difference {r['difference']:+.3f} "
          f"(95% CI {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}): {'adopted' if r['adopted'] else 'not adopted'}")
    return 0


COMMANDS = (
    Command("index", "index a data source and print the summary", _options_index, _run_index),
    Command("fetch-breakhis", "download the official BreaKHis_v1.tar.gz", _options_fetch_breakhis, _run_fetch_breakhis),
    Command("split", "write a patient-wise split CSV", _options_split, _run_split),
    Command("train", "train, cross-validate and write a model folder", _options_train, _run_train),
    Command("evaluate", "metrics on held-out patients", _options_evaluate, _run_evaluate),
    Command("leakage-demo", "image-wise vs patient-wise split, same recipe", _options_leakage_demo, _run_leakage_demo),
    Command("rescore", "recompute a card's figures from its predictions.csv", _options_rescore, _run_rescore),
    Command("pick-recipe", "ship the candidate with the higher cross-validated AUC",
            _options_pick_recipe, _run_pick_recipe),
    Command("frozen-cv", "repeated grouped CV of frozen-feature recipes (whole frame, tiles, MIL, both)",
            _options_frozen_cv, _run_frozen_cv),
    Command("repeats-cv", "rule 1 for a trained recipe: runs of one train command with different --seed, read back "
            "and compared on identical folds with frozen recipes",
            _options_repeats_cv, _run_repeats_cv),
    Command("scale-cv", "tile model vs scale shift: trained at one scale or scale-augmented, same folds",
            _options_scale_cv, _run_scale_cv),
    Command("subtype-cv", "the eight subtypes, flat and hierarchical, patient-grouped (and image-wise, labelled "
            "leakage) repeated CV on frozen tile embeddings",
            _options_subtype_cv, _run_subtype_cv),
    Command("idc-cv", "IDC patches: patient-wise repeated CV of frozen Lite2 features at input sizes",
            _options_idc_cv, _run_idc_cv),
    Command("train-idc", "ship an IDC patch model (frozen Lite2 + logistic regression) with its card",
            _options_train_idc, _run_train_idc),
    Command("distill-resnet50", "ResNet-50 tile embedding distilled from frozen Lite2 (no labels), then rule-1 CV of "
            "its frozen tile-mean features vs Lite2's",
            _options_distill_resnet50, _run_distill_resnet50),
    Command("idc-finetune-cv", "IDC: fine-tuned Lite2 vs frozen Lite2 + LR on the same patient folds",
            _options_idc_finetune_cv, _run_idc_finetune_cv),
    Command("served-policy-gap", "nested: a policy fitted on fold models' logits, applied to a model trained on all "
            "patients (frozen Lite2 + LR, the recipe cheap to nest)",
            _options_served_policy_gap, _run_served_policy_gap),
    Command("calibrate-magnifications", "a pooled model's per-magnification temperatures, into its card",
            _options_calibrate_magnifications, _run_calibrate_magnifications),
    Command("build-ensemble", "seed ensemble of runs of one train command on the same folds: one model",
            _options_build_ensemble, _run_build_ensemble),
    Command("fit-refer", "fit a model's refer-when-unsure policy (uncertainty band + OOD score)",
            _options_fit_refer, _run_fit_refer),
    Command("train-tiles", "ship a native-tile model: frozen Lite2 per tile + attention-MIL or mean head",
            _options_train_tiles, _run_train_tiles),
    Command("paired-runs", "two runs of one recipe on the same folds: paired AUC difference, adopted or not",
            _options_paired_runs, _run_paired_runs),
    Command("threshold-cv", "nested: does a per-magnification threshold beat the single one on held-out patients",
            _options_threshold_cv, _run_threshold_cv),
    Command("select-defaults", "choose each magnification's model from validation",
            _options_select_defaults, _run_select_defaults),
)


def main(argv: list[str] | None = None) -> int:
    """Parse, set up logging, run the command; expected failures are one line on stderr (exit 2), no traceback."""
    args = build_parser("python -m training", COMMANDS).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        return int(next(c for c in COMMANDS if c.name == args.cmd).run(args) or 0)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
