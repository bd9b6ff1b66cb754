#!/usr/bin/env bash
# Reproduces every model in magnif_models/ from ../shared/data/breakhis (the only data used), then the
# leakage demonstration and the validation-driven defaults. About 4 hours on 2 AVX2 CPU cores (fp32).
#   scripts/train_shipped_models.sh [all|lite2|resnet|hybrid|generalisation|repeats|tasks|verdicts|rule1-ensemble|select]
# Every run splits its out-of-fold figures by QC and (single-magnification models) predicts held-out patients'
# frames at the other magnifications; --tta-eval also scores the same fold models with 8-view TTA.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/breakhis}
LITE2=${LITE2:-../shared/weights/efficientnet_lite2_in1k.safetensors}
PY=${PY:-python}
C=build/candidates   # git-ignored: recipes compared before one is shipped
only=${1:-all}
run() { echo "== $*"; "$PY" -m training train --data "$DATA" "$@"; }
if [[ $only == all || $only == lite2 ]]; then
  # Two recipes per magnification on the same outer folds; the one with the higher CV AUC ships.
  # Pooled: fine-tuning vs frozen-feature LR, the latter with and without stain normalisation (same folds).
  run --magnification all --arch efficientnet_lite2 --init "$LITE2" --out $C/all/efficientnet_lite2_finetune --cv 5 --epochs 3
  for st in none reinhard; do
    run --magnification all --arch efficientnet_lite2 --init "$LITE2" --out $C/all/efficientnet_lite2_logreg_stain-$st \
        --cv 5 --recipe logreg --stain $st --tta-eval
  done
  run --magnification all --arch efficientnet_lite2 --init "$LITE2" --out $C/all/efficientnet_lite2_logreg_stain-macenko \
      --cv 5 --recipe logreg --stain macenko --tta-eval
  "$PY" -m training pick-recipe --candidates $C/all/efficientnet_lite2_finetune $C/all/efficientnet_lite2_logreg_stain-* \
        --out magnif_models/all/efficientnet_lite2
  # 100X: fine-tuning without and with Reinhard normalisation vs frozen-feature LR, all on the same 5 folds.
  for st in none reinhard; do
    run --magnification 100X --arch efficientnet_lite2 --init "$LITE2" --out $C/100X/efficientnet_lite2_finetune_stain-$st \
        --cv 5 --epochs 4 --stain $st --tta-eval
  done
  run --magnification 100X --arch efficientnet_lite2 --init "$LITE2" --out $C/100X/efficientnet_lite2_logreg --cv 5 --recipe logreg
  "$PY" -m training pick-recipe --candidates $C/100X/efficientnet_lite2_finetune_stain-* $C/100X/efficientnet_lite2_logreg \
        --out magnif_models/100X/efficientnet_lite2
fi
if [[ $only == all || $only == resnet ]]; then
  # No ResNet-50 ImageNet weights exist here: from scratch, cheap schedule (3 folds, 5 epochs) to fit a CPU session.
  # 100X without and with Reinhard normalisation on the same 3 folds (the better ships); pooled without.
  for st in none reinhard; do
    run --magnification 100X --arch resnet50 --init scratch --out $C/100X/resnet50_stain-$st --cv 3 --epochs 5 --patience 4 \
        --stain $st --tta-eval
  done
  "$PY" -m training pick-recipe --candidates $C/100X/resnet50_stain-* --out magnif_models/100X/resnet50
  run --magnification all --arch resnet50 --init scratch --out magnif_models/all/resnet50 --cv 3 --epochs 5 --patience 4 --tta-eval
  # Pooled Reinhard variant, same folds, measured as a candidate (AUC 0.498 vs 0.673 plain: not shipped).
  run --magnification all --arch resnet50 --init scratch --out $C/all/resnet50_stain-reinhard --cv 3 --epochs 5 --patience 4 \
      --stain reinhard --tta-eval
fi
if [[ $only == all || $only == hybrid ]]; then
  # Lite2 CNN branch (ImageNet) + hybrid ViT on its tokens (scratch); phases 30/2/1 epochs; 3 folds to fit a CPU session.
  # Without and with Reinhard normalisation on the same 3 folds; the better pooled CV AUC ships.
  for st in none reinhard; do
    run --magnification all --arch hybrid --init "$LITE2" --out $C/all/hybrid_stain-$st --cv 3 --stain $st --tta-eval
  done
  "$PY" -m training pick-recipe --candidates $C/all/hybrid_stain-* --out magnif_models/all/hybrid
fi
if [[ $only == all || $only == generalisation ]]; then
  # Issue 18. The reference recipe: ImageNet Lite2 fine-tuned end to end, pooled over magnifications, HED + HSV colour
  # augmentation, patient-balanced sampling, 6 epochs, on the same 5 folds as the pooled logistic regression
  # (about 100 min on 2 AVX2 cores in fp32).
  run --magnification all --arch efficientnet_lite2 --init "$LITE2" --recipe full --lr 2e-4 --epochs 6 --patience 6 \
      --colour-aug hed --balanced-sampling --cv 5 --tta-eval --out magnif_models/all/efficientnet_lite2_finetuned
  # The same recipe without HED/HSV augmentation (mild jitter only), same folds and seeds: what colour augmentation buys
  # (a candidate, not shipped; about 60-110 min on 2 AVX2 cores), then the paired comparison on identical folds.
  run --magnification all --arch efficientnet_lite2 --init "$LITE2" --recipe full --lr 2e-4 --epochs 6 --patience 6 \
      --colour-aug mild --balanced-sampling --cv 5 --out $C/all/efficientnet_lite2_full_colour-mild
  "$PY" scripts/generalisation_table.py --compare magnif_models/all/efficientnet_lite2_finetuned \
      $C/all/efficientnet_lite2_full_colour-mild --out benchmarks/results/colour_aug.json
  # Tile model vs scale shift, trained at one scale or scale-augmented, same folds (3 split seeds x 5).
  "$PY" -m training scale-cv --data "$DATA" --out benchmarks/results/scale_cv.json
  # Frozen-feature recipes over 3 split seeds x 5 folds (whole frame, native tiles, MIL, both scales, fold ensembles),
  # then the shipped tile model (frozen Lite2 per native tile + attention-MIL), same 5 folds as above.
  "$PY" -m training frozen-cv --data "$DATA" --out benchmarks/results/frozen_cv.json
  "$PY" -m training train-tiles --data "$DATA" --pooling attention --out magnif_models/all/efficientnet_lite2_tiles_mil
  # Rule 1 for the routed recipe: the same command with --seed 1 and 2 (other folds and training seeds; 33-62 min each
  # with bf16), read back on frozen-cv's folds beside the frozen recipes.
  for s in 1 2; do
    run --magnification all --arch efficientnet_lite2 --init "$LITE2" --recipe full --lr 2e-4 --epochs 6 --patience 6 \
        --colour-aug hed --balanced-sampling --cv 5 --cv-only --seed $s --out build/repeats/all/efficientnet_lite2_finetuned_seed$s
  done
  "$PY" -m training repeats-cv --data "$DATA" --name "all/efficientnet_lite2_finetuned recipe (routed; ImageNet, fine-tuned)" \
      --runs magnif_models/all/efficientnet_lite2_finetuned build/repeats/all/efficientnet_lite2_finetuned_seed1 build/repeats/all/efficientnet_lite2_finetuned_seed2 \
      --out benchmarks/results/repeats_lite2_finetuned.json
fi
if [[ $only == all || $only == repeats ]]; then
  # Rule 1 for the other trained candidates: each one's shipped recipe at 5 folds (frozen-cv's folds), split seeds
  # 0-2; the from-scratch ResNet-50s also over training seeds 0-2 on split seed 0's folds (--train-seed). Runs go to
  # the git-ignored build/repeats/; minutes per run are in each results JSON.
  R=build/repeats
  for m in 100X all; do
    for s in 0 1 2; do
      run --magnification $m --arch resnet50 --init scratch --cv 5 --epochs 5 --patience 4 --seed $s --out $R/$m/resnet50_seed$s
    done
    for t in 1 2; do
      run --magnification $m --arch resnet50 --init scratch --cv 5 --epochs 5 --patience 4 --seed 0 --train-seed $t \
          --out $R/$m/resnet50_seed0_train$t
    done
  done
  "$PY" -m training repeats-cv --data "$DATA" --magnification 100X --name "100X/resnet50 recipe (scratch)" \
      --runs $R/100X/resnet50_seed{0,1,2} $R/100X/resnet50_seed0_train{1,2} --out benchmarks/results/repeats_resnet50_100X.json
  INC="magnif_models/all/efficientnet_lite2_finetuned $R/all/efficientnet_lite2_finetuned_seed1 $R/all/efficientnet_lite2_finetuned_seed2"
  "$PY" -m training repeats-cv --data "$DATA" --name "all/resnet50 recipe (scratch)" --incumbent-runs $INC \
      --runs $R/all/resnet50_seed{0,1,2} $R/all/resnet50_seed0_train{1,2} --out benchmarks/results/repeats_resnet50_all.json
  for s in 0 1 2; do
    run --magnification 100X --arch efficientnet_lite2 --init "$LITE2" --cv 5 --epochs 4 --seed $s --out $R/100X/efficientnet_lite2_seed$s
  done
  "$PY" -m training repeats-cv --data "$DATA" --magnification 100X --name "100X/efficientnet_lite2 recipe (ImageNet, fine-tuned)" \
      --runs $R/100X/efficientnet_lite2_seed{0,1,2} --out benchmarks/results/repeats_lite2_100X.json
  for s in 0 1 2; do
    run --magnification all --arch hybrid --init "$LITE2" --cv 5 --seed $s --out $R/all/hybrid_seed$s
  done
  "$PY" -m training repeats-cv --data "$DATA" --name "all/hybrid recipe (ImageNet CNN + scratch ViT)" --incumbent-runs $INC \
      --runs $R/all/hybrid_seed{0,1,2} --out benchmarks/results/repeats_hybrid_all.json
fi
if [[ $only == all || $only == tasks ]]; then
  # Issue 17: IDC patches and the eight subtypes (frozen Lite2; minutes with cached features).
  "$PY" -m training idc-cv --data ../shared/data/idc --sizes 112 224 --out benchmarks/results/idc_cv.json
  "$PY" -m training train-idc --data ../shared/data/idc --out magnif_models/idc/efficientnet_lite2_idc --size 224
  "$PY" -m training subtype-cv --data "$DATA" --parent-model magnif_models/all/efficientnet_lite2_finetuned \
      --out benchmarks/results/subtype_cv.json
  "$PY" -m training train --task subtype --strategy hierarchical --data "$DATA" \
      --parent-model magnif_models/all/efficientnet_lite2_finetuned --n-boot 500 --out magnif_models/subtype/efficientnet_lite2_subtype
fi
if [[ $only == rule1-ensemble ]]; then
  # Issue 25: the seed ensemble under rule 1 on split seeds 0-2. Split seed 0's members are the shipped run and
  # build/ensemble/member_train{10,20}; each further split seed needs its single run (training seed = split seed, also
  # the single recipe's rule-1 repeat) and training seeds 10 and 20: 6 runs with --cv-only (out-of-fold evaluation, no
  # refit; about 20 min each with bf16 on 2 cores). Every run's card and out-of-fold predictions are archived in
  # benchmarks/results/oof_runs (build/ does not outlive the machine); repeats-cv reads every split seed's members
  # there as one ensemble, beside the single runs on the same folds.
  A=benchmarks/results/oof_runs/all_efficientnet_lite2_finetuned
  "$PY" scripts/archive_oof.py magnif_models/all/efficientnet_lite2_finetuned build/ensemble/member_train10 \
      build/ensemble/member_train20 --into $A
  for s in 1 2; do
    for t in $s 10 20; do
      o=build/ensemble_s$s/member_train$t
      [[ $t == "$s" ]] && o=build/repeats/all/efficientnet_lite2_finetuned_seed$s
      run --magnification all --arch efficientnet_lite2 --init "$LITE2" --recipe full --lr 2e-4 --epochs 6 --patience 6 \
          --colour-aug hed --balanced-sampling --cv 5 --cv-only --seed $s --train-seed $t --out $o
      "$PY" scripts/archive_oof.py $o --into $A
    done
  done
  "$PY" -m training repeats-cv --data "$DATA" --seed-ensemble --name "all/efficientnet_lite2_ensemble recipe" \
      --runs $A/s0_t0 $A/s0_t10 $A/s0_t20 $A/s1_t1 $A/s1_t10 $A/s1_t20 $A/s2_t2 $A/s2_t10 $A/s2_t20 \
      --incumbent-runs $A/s0_t0 $A/s1_t1 $A/s2_t2 --out benchmarks/results/repeats_lite2_ensemble_3seeds.json
fi
if [[ $only == all || $only == verdicts ]]; then
  # Issue 25. The routed recipe as a seed ensemble: the shipped run (training seed 0) and the same command with
  # training seeds 10 and 20 on the same folds (split seed 0; --tta-eval left out: the ensemble is scored plain),
  # about 35-50 min each with bf16 on 2 cores; then one model folder, its per-magnification temperatures, its refer
  # and case policies, and the tables.
  for t in 10 20; do
    run --magnification all --arch efficientnet_lite2 --init "$LITE2" --recipe full --lr 2e-4 --epochs 6 --patience 6 \
        --colour-aug hed --balanced-sampling --cv 5 --seed 0 --train-seed $t --out build/ensemble/member_train$t
  done
  "$PY" -m training build-ensemble --runs magnif_models/all/efficientnet_lite2_finetuned build/ensemble/member_train10 \
      build/ensemble/member_train20 --out magnif_models/all/efficientnet_lite2_ensemble \
      --rule1-out benchmarks/results/repeats_lite2_ensemble.json
  "$PY" -m training fit-refer --model magnif_models/all/efficientnet_lite2_ensemble --idc ../shared/data/idc
  "$PY" -m training calibrate-magnifications --model magnif_models/all/efficientnet_lite2_finetuned
  "$PY" -m training fit-refer --model magnif_models/all/efficientnet_lite2_finetuned --idc ../shared/data/idc
  "$PY" -m training threshold-cv --model magnif_models/all/efficientnet_lite2_ensemble --out benchmarks/results/threshold_cv.json
  "$PY" -m training served-policy-gap --data "$DATA" --out benchmarks/results/served_policy_gap.json
  "$PY" -m training idc-finetune-cv --data ../shared/data/idc --size 112 --epochs 4 --also-frozen-size 224 \
      --save-backbone build/idc/lite2_idc_finetuned_backbone.safetensors \
      --ship-to magnif_models/idc/efficientnet_lite2_idc_finetuned --out benchmarks/results/idc_finetune.json
  # IDC fine-tuning as the BreakHis initialisation: the routed recipe's command (split seed 0, training seed 0, as the
  # shipped single run) from the IDC backbone saved above, then the paired comparison on the same folds
  run --magnification all --arch efficientnet_lite2 --init build/idc/lite2_idc_finetuned_backbone.safetensors \
      --recipe full --lr 2e-4 --epochs 6 --patience 6 --colour-aug hed --balanced-sampling --cv 5 --seed 0 \
      --out build/candidates/all/efficientnet_lite2_finetuned_idcinit
  "$PY" -m training paired-runs --challenger build/candidates/all/efficientnet_lite2_finetuned_idcinit \
      --incumbent magnif_models/all/efficientnet_lite2_finetuned --what "IDC fine-tuned vs ImageNet initialisation" \
      --out benchmarks/results/idc_init_breakhis.json
  "$PY" benchmarks/ensemble_latency.py
  "$PY" benchmarks/qc_refusals.py --out benchmarks/results/qc_refusals.json
  "$PY" benchmarks/train_speed.py --run build/ensemble/member_train10 --out benchmarks/results/train_speed.json
  "$PY" scripts/verdicts_table.py
fi
"$PY" -m training leakage-demo --data "$DATA" --magnification 100X --out magnif_models/leakage_demo_100X.json
"$PY" -m training rescore magnif_models/*/*/   # QC figures and the temperature guard for cards trained before them
"$PY" -m training fit-refer --model magnif_models/all/efficientnet_lite2_finetuned --idc ../shared/data/idc  # refer policy
[ -d magnif_models/all/efficientnet_lite2_ensemble ] && \
  "$PY" -m training fit-refer --model magnif_models/all/efficientnet_lite2_ensemble --idc ../shared/data/idc
"$PY" -m training select-defaults --root magnif_models
"$PY" scripts/robustness_table.py --out benchmarks/results/robustness.json magnif_models/*/*/ $C/*/*_stain-*
"$PY" scripts/generalisation_table.py
