"""Distribution of the quality measures over the training frames (where models/quality.py thresholds come from)."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.quality import check_quality  # noqa: E402

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/breakhis")
man = pd.read_csv(data / "manifest.csv")
vals = np.array([(q.blur_variance, q.tissue_fraction, q.he_fraction) for q in
                 (check_quality(Image.open(data / p).convert("RGB")) for p in man["path"])])
for name, col in zip(["blur_variance", "tissue_fraction", "he_fraction"], vals.T):
    print(f"{name:16s} min {col.min():8.3f}  p1 {np.percentile(col, 1):8.3f}  p5 {np.percentile(col, 5):8.3f}  median {np.median(col):8.3f}  (n={len(col)})")
