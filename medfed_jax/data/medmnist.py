"""MedMNIST v2 / MedMNIST+ 2D datasets, read from the official ``.npz`` files on disk.

Never downloads. The files are ``<flag>.npz`` (28x28) or ``<flag>_<size>.npz``
(64, 128, 224) with keys ``train_images, train_labels, val_images,
val_labels, test_images, test_labels``: uint8 images ``[N, H, W]``
(grayscale) or ``[N, H, W, 3]`` (RGB) and labels ``[N, 1]``. They are looked
for in ``root``, else ``$MEDMNIST_ROOT``, else ``~/.medmnist`` (where
``python -m medmnist download`` puts them).
"""

from __future__ import annotations

import os
import pathlib
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

# Number of classes of each single-label 2D MedMNIST dataset (medmnist.INFO).
NUM_CLASSES = {
    "pathmnist": 9,
    "dermamnist": 7,
    "bloodmnist": 8,
    "octmnist": 4,
    "pneumoniamnist": 2,
    "breastmnist": 2,
    "tissuemnist": 8,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
    "retinamnist": 5,
}
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


class MedMNIST(NamedTuple):
    """The official splits as ``(x [N, H, W, C] float32 in [0, 1], y [N] int32)`` pairs."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int


def check_flag(flag: str, size: int = 28) -> None:
    """Refuse unsupported datasets and sizes with a ValueError naming the choices."""
    if flag == "chestmnist":
        raise ValueError(
            "chestmnist is multi-label (14 binary findings per image) and medfed_jax trains single-label "
            f"classifiers; choose one of {tuple(NUM_CLASSES)}."
        )
    if flag not in NUM_CLASSES:
        raise ValueError(f"MedMNIST flag {flag!r} is not a supported 2D dataset; choose one of {tuple(NUM_CLASSES)}.")
    if size not in SIZES:
        raise ValueError(f"MedMNIST size={size!r} is not available; choose one of {SIZES}.")


def medmnist_path(flag: str, root: str | os.PathLike | None = None, size: int = 28) -> pathlib.Path:
    """Where the file for ``flag`` at ``size`` is expected."""
    check_flag(flag, size)
    base = root or os.environ.get("MEDMNIST_ROOT") or "~/.medmnist"
    return pathlib.Path(base).expanduser() / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def _images(images: np.ndarray, size: int, path: pathlib.Path) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:3] != (size, size) or images.shape[3] not in (1, 3):
        raise ValueError(
            f"{path}: images of shape {images.shape} are not [N, {size}, {size}] or [N, {size}, {size}, 3]; "
            "is this the file for the requested size?"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images have dtype {images.dtype}, expected uint8 as in the official files.")
    return images.astype(np.float32) / 255.0


def load_medmnist(flag: str, root: str | os.PathLike | None = None, size: int = 28) -> MedMNIST:
    """Load one MedMNIST dataset's official train/val/test splits from disk.

    Images become float32 in [0, 1] with a trailing channel axis (1 or 3);
    labels are flattened to int32 in ``[0, num_classes)``.
    """
    path = medmnist_path(flag, root, size)
    if not path.is_file():
        raise FileNotFoundError(
            f"MedMNIST file not found: {path}. medfed_jax never downloads; get it with "
            f"`pip install medmnist && python -m medmnist download --size={size} --root={path.parent}` "
            "(every dataset at that size; the folder must exist) or from https://medmnist.com "
            "(Zenodo: https://doi.org/10.5281/zenodo.10519652), then point data.root or $MEDMNIST_ROOT at "
            "its folder."
        )
    num_classes = NUM_CLASSES[flag]
    download = f"delete it and download it again with `python -m medmnist download --size={size} --root={path.parent}`"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path} is not an .npz file (it does not start like a zip archive); {download}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files
            arrays = {k: npz[k] for k in names if k.split("_")[0] in SPLITS}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path} is not a readable .npz file (corrupt or truncated: {error}); {download}.") from None
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in names]
    if missing:
        raise ValueError(
            f"{path} lacks the keys {missing} (has {sorted(names)}); it is not an official MedMNIST file. "
            "Re-download it with `python -m medmnist download`."
        )
    splits = {}
    for s in SPLITS:
        x, y = _images(arrays[f"{s}_images"], size, path), arrays[f"{s}_labels"]
        if y.ndim not in (1, 2) or y.size != len(x):
            raise ValueError(f"{path}: {s}_labels has shape {y.shape}, expected [{len(x)}, 1].")
        y = y.reshape(-1).astype(np.int32)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{path}: {s}_labels outside [0, {num_classes}) for {flag}.")
        splits[s] = (x, y)
    return MedMNIST(**splits, num_classes=num_classes)
