"""Fed-Heart-Disease: the UCI heart-disease data of four real hospitals, bundled.

Preprocessing follows FLamby's Fed-Heart-Disease task (du Terrail et al.,
NeurIPS 2022 Datasets and Benchmarks; ``flamby/datasets/fed_heart_disease``):

1. Read the bundled ``heart_disease_uci.csv`` (provenance and licence in
   ``HEART_DISEASE_PROVENANCE.md`` beside it) with the csv module.
2. Keep ``age, sex, cp, trestbps, chol, fbs, restecg, thalch, exang,
   oldpeak``; drop ``slope, ca, thal`` (mostly missing outside Cleveland).
3. Drop every row with an empty field among the kept columns. Only empty
   fields count as missing: ``chol == 0`` (how Switzerland and VA Long Beach
   record an unmeasured cholesterol) is kept as a value, as FLamby does. This
   rule gives exactly 304 / 260 / 46 / 130 = 740 patients (Cleveland /
   Hungary / Switzerland / VA Long Beach); treating ``chol == 0`` as missing
   too would leave 304 / 260 / 0 / 97, deleting Switzerland.
4. Encode: sex Male=1/Female=0; fbs and exang TRUE=1/FALSE=0; ``cp`` and
   ``restecg`` dummy-coded with the first level dropped, like FLamby's
   ``pd.get_dummies(drop_first=True)`` on the UCI codes (cp: atypical angina,
   non-anginal, asymptomatic vs typical angina; restecg: st-t abnormality,
   lv hypertrophy vs normal). 8 numeric + 3 + 2 = 13 features, `FEATURES`.
5. Label: ``num > 0`` (heart disease) = 1, ``num == 0`` = 0.
6. Split each hospital's rows 66/34 into train/test (ceil(0.34 n) test rows,
   stratified by label, seeded: `partition.split_train_test`), which gives
   200/104, 171/89, 30/16, 85/45 (FLamby: 199/104, 172/89, 30/16, 85/45).
7. Standardise each hospital with the mean and standard deviation of its own
   training split only, applied to its train and test rows. Constant
   training columns (e.g. Switzerland's chol, all 0) are only centred.

The pooled version (``pooled=True``) is the union of the four hospitals'
already standardised rows in one client, which is what FLamby's pooled
baseline trains on (the same per-centre rows, concatenated).
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import pathlib
from typing import Any

import numpy as np

from medfed_jax.data import base
from medfed_jax.data.partition import federate, natural
from medfed_jax.types import FederatedDataset

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
KEPT = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak")
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
BINARY = {"sex": "Male", "fbs": "TRUE", "exang": "TRUE"}
# Categories in UCI code order; the first is the dropped reference level.
CATEGORIES = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
}
FEATURES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    *(f"{col}={level}" for col, levels in CATEGORIES.items() for level in levels[1:]),
)  # fmt: skip
TEST_FRACTION = 0.34


REINSTALL = "restore it (pip install --force-reinstall medfed_jax, or git checkout the file)"


def _encode(row: dict[str, str], where: str) -> list[float]:
    def number(col: str) -> float:
        try:
            return float(row[col])
        except ValueError:
            raise ValueError(f"{where}, column {col!r}: {row[col]!r} is not a number; {REINSTALL}.") from None

    values = {c: number(c) for c in NUMERIC}
    values.update({c: float(row[c] == true) for c, true in BINARY.items()})
    for col, levels in CATEGORIES.items():
        if row[col] not in levels:
            raise ValueError(f"{where}, column {col!r}: unknown value {row[col]!r} (known: {levels}); {REINSTALL}.")
        values.update({f"{col}={level}": float(row[col] == level) for level in levels[1:]})
    return [values[f] for f in FEATURES]


def read_heart_disease(source: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-5: the 740 complete patients before any split or scaling.

    ``source``: the CSV (a path or a `importlib.resources` file; default the
    bundled one). Returns ``x [740, 13]`` float64 (columns `FEATURES`),
    ``y [740]`` int32 and ``hospital [740]`` (str), in file order. A malformed
    file is refused naming its row (line) and column.
    """
    source = source or importlib.resources.files("medfed_jax.data").joinpath("heart_disease_uci.csv")
    source = pathlib.Path(source) if isinstance(source, (str, os.PathLike)) else source
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*KEPT, "num", "dataset") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{source}: lacks the columns {missing}; {REINSTALL}.")
        encoded, labels, hospitals = [], [], []
        for row in reader:
            where = f"{source}, line {reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise ValueError(
                    f"{where}: {len(reader.fieldnames)} fields expected, the row has another count; {REINSTALL}."
                )
            if not all(row[c].strip() for c in KEPT):
                continue
            encoded.append(_encode(row, where))
            try:
                labels.append(int(row["num"]) > 0)
            except ValueError:
                raise ValueError(f"{where}, column 'num': {row['num']!r} is not an integer; {REINSTALL}.") from None
            hospitals.append(row["dataset"])
    return np.array(encoded, np.float64).reshape(-1, len(FEATURES)), np.array(labels, np.int32), np.array(hospitals)


def load_heart_disease(pooled: bool = False, seed: int = 0, test_fraction: float = TEST_FRACTION) -> FederatedDataset:
    """Fed-Heart-Disease: 4 hospital clients (or 1 pooled client), 13 features, 2 classes.

    ``seed`` fixes the per-hospital train/test split; ``info['features']``
    names the columns and ``info['rows']`` the CSV-order rows of each split.
    """
    x, y, hospital = read_heart_disease()
    parts, names = natural(hospital)
    dataset = federate(
        x,
        y,
        parts,
        test_fraction=test_fraction,
        seed=seed,
        name="heart",
        num_classes=2,
        client_names=names,
        standardize="client",
    )
    dataset.info["features"] = FEATURES
    return base.pooled(dataset) if pooled else dataset
