"""Datasets that ship with scikit-learn (no network): digits and breast cancer."""

from __future__ import annotations

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray]:
    """UCI handwritten digits: ``x [1797, 8, 8, 1]`` float32 in [0, 1] (pixels / 16), ``y`` in 0..9."""
    from sklearn import datasets as sk_datasets  # here, not at module level: scikit-learn takes ~0.5 s to import

    bunch = sk_datasets.load_digits()
    return (bunch.images / 16.0).astype(np.float32)[..., None], bunch.target.astype(np.int32)


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Wisconsin diagnostic breast cancer: ``x [569, 30]`` raw float32 features,
    ``y`` 0 = malignant, 1 = benign (scikit-learn's coding). Unscaled:
    `load_dataset` standardises it with training statistics."""
    from sklearn import datasets as sk_datasets

    bunch = sk_datasets.load_breast_cancer()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int32)
