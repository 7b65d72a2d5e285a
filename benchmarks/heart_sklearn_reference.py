"""Independent reference for the heart headline: scikit-learn logistic regression on pooled training rows.

python benchmarks/heart_sklearn_reference.py
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from medfed_jax.data import load_heart_disease, unstack_clients


def main() -> None:
    dataset = load_heart_disease()
    train_x, train_y = (np.concatenate(a) for a in unstack_clients(dataset.train))
    test_xs, test_ys = unstack_clients(dataset.test)
    model = LogisticRegression(max_iter=1000).fit(train_x, train_y)
    pooled = model.score(np.concatenate(test_xs), np.concatenate(test_ys))
    per_client = [model.score(x, y) for x, y in zip(test_xs, test_ys)]
    print(f"pooled test accuracy {100 * pooled:.1f}%")
    for name, accuracy in zip(dataset.client_names, per_client):
        print(f"  {name}: {100 * accuracy:.1f}%")


if __name__ == "__main__":
    main()
