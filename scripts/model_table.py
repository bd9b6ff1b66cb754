"""Print the README's model table from the shipped cards (so every number there comes from a script).

Usage: python scripts/model_table.py [magnif_models]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.card import ALL, MAGNIFICATIONS, Metric, ModelCard, metric  # noqa: E402
from models.folders import list_model_folders  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else "magnif_models")


def ci(m: Metric) -> str:
    v, (lo, hi) = m.value, m.ci95
    return f"{v:.3f} ({lo:.2f}–{hi:.2f})" if v == v else "n/a"


print("| model | init | evaluated at | test patients (b/m) | images (b/m) | AUC (95% CI) | balanced acc. | "
      "patient acc. | patient score | ECE | baseline AUC |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for folder in list_model_folders(root):
    c = ModelCard.from_json(folder / "card.json")
    rows = [("all its data", c.overall, c.baseline.get("overall"))]
    if c.magnification == ALL:
        rows += [(m, c.per_magnification[m], c.baseline.get("per_magnification", {}).get(m))
                 for m in MAGNIFICATIONS if m in c.per_magnification]
    xm = c.evaluation.get("cross_magnification") or {}
    rows += [(f"{m} (borrowed: cross-magnification check)", xm[m], None) for m in MAGNIFICATIONS if m in xm]
    for where, s, b in rows:
        m, n, k = {name: metric(s, name) for name in s["metrics"]}, s["n_patients"], s["n_images"]
        init = c.init["init"] if c.init["init"] in ("scratch", "imagenet") else "ImageNet Lite2 file"
        if c.architecture == "hybrid":
            init = "Lite2 file (CNN) + scratch (ViT)"
        print(f"| {c.model_id} | {init} "
              f"| {where} | {n['benign']}/{n['malignant']} | {k['benign']}/{k['malignant']} | {ci(m['auc'])} | "
              f"{ci(m['balanced_accuracy'])} | {ci(m['patient_accuracy'])} | {ci(m['patient_score'])} | "
              f"{m['ece'].value:.3f} | {ci(metric(b)) if b else 'n/a'} |")
d = root / "defaults.json"
if d.is_file():
    print("\n| magnification | served by | AUC there (95% CI) | why |")
    print("|---|---|---|---|")
    for mag, e in json.loads(d.read_text()).items():
        if "pooled" not in e:  # the IDC and subtype entries route other tasks (their own tables)
            continue
        flag = " (pooled)" if e["pooled"] else " (borrowed)" if e.get("borrowed") else ""
        few = "; few patients" if e["few_patients"] else ""
        print(f"| {mag} | {e['model_id']}{flag} | {e['auc']:.3f} ({e['auc_ci95'][0]:.2f}–{e['auc_ci95'][1]:.2f}) | "
              f"{e['reason']}{few} |")
leak = sorted(root.glob("leakage_demo_*.json"))
for f in leak:
    r = json.loads(f.read_text())
    print(f"\nLeakage demonstration ({r['magnification']}, {r['n_images']} images, {r['n_patients']} patients, frozen Lite2 + "
          f"logistic regression): image-wise random split AUC {r['image_wise_random']['auc']:.3f} vs patient-grouped "
          f"AUC {r['patient_grouped']['auc']:.3f}: inflation {r['auc_inflation']:+.3f}.")
