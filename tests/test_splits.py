import numpy as np
import pandas as pd
import pytest

from training.splits import assert_patient_disjoint, grouped_kfold, leave_one_patient_out, patient_split


def _df(n_benign=8, n_malig=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_benign + n_malig):
        for j in range(int(rng.integers(1, 30))):
            rows.append({"path": f"p{i}_{j}", "patient": str(1000 + i), "label": "benign" if i < n_benign else "malignant",
                         "magnification": "100X"})
    return pd.DataFrame(rows)


def test_patient_split_is_patient_wise_stratified_and_seeded():
    df = _df()
    part = patient_split(df, seed=3)
    assert_patient_disjoint(df["patient"], part)
    for p in ("train", "val", "test"):
        assert set(df.loc[part == p, "label"]) == {"benign", "malignant"}
    assert part.equals(patient_split(df, seed=3))
    assert not part.equals(patient_split(df, seed=4))


def test_grouped_kfold_and_lopo_never_share_patients():
    df = _df()
    fold = grouped_kfold(df, 5, seed=0)
    assert_patient_disjoint(df["patient"], fold)
    assert fold.nunique() == 5
    for k in range(5):
        assert set(df.loc[fold == k, "label"]) == {"benign", "malignant"}
    lopo = leave_one_patient_out(df)
    assert lopo.nunique() == df["patient"].nunique()
    assert_patient_disjoint(df["patient"], lopo)


def test_leak_detector_fails_on_image_wise_split():
    df = _df()
    image_wise = pd.Series(np.arange(len(df)) % 2)
    with pytest.raises(AssertionError, match="more than one part"):
        assert_patient_disjoint(df["patient"], image_wise)
