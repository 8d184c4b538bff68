"""Golden mutual information for activation matching (run from the repository root):

    venv-mk/bin/python tests/golden/align/gen_mi.py

Features come from closed-form formulas (tests/align/align_information.rs rebuilds them):
`a[n, i] = sin(0.37 (n + 1) (i + 1) + 0.5 i)` for 300 samples and 4 units, and 5 units of
`b` that depend on `a` non-linearly (or not at all). Each unit is binned into 6
equal-width bins over its own range (the lower end in bin 0, the upper end in the last
bin), and scikit-learn's `mutual_info_score` gives the plug-in mutual information (nats)
of every pair. The Gaussian estimate is `-ln(1 - r^2) / 2` of numpy's Pearson `r`.
Writes tests/golden/align/mi.txt: one line per matrix, `name rows cols | values`.
"""
import os

import numpy as np
import sklearn
from sklearn.metrics import mutual_info_score

HERE = os.path.dirname(os.path.abspath(__file__))
N, DA, BINS = 300, 4, 6


def features():
    n = np.arange(N, dtype=np.float64)
    a = np.stack([np.sin(0.37 * (n + 1) * (i + 1) + 0.5 * i) for i in range(DA)], axis=1)
    b = np.stack(
        [
            a[:, 2] ** 2,
            np.cos(3.0 * a[:, 0]),
            a[:, 1] + 0.3 * np.sin(n),
            np.sin(1.7 * n + 0.1),
            np.abs(a[:, 3]),
        ],
        axis=1,
    )
    return a, b


def labels(x):
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return np.zeros(len(x), dtype=int)
    k = np.floor((x - lo) / (hi - lo) * BINS)
    return np.clip(k, 0, BINS - 1).astype(int)


def main():
    a, b = features()
    binned = np.array(
        [[mutual_info_score(labels(a[:, i]), labels(b[:, j])) for j in range(b.shape[1])] for i in range(DA)]
    )
    r = np.array([[np.corrcoef(a[:, i], b[:, j])[0, 1] for j in range(b.shape[1])] for i in range(DA)])
    gauss = -0.5 * np.log(1.0 - r**2)
    with open(os.path.join(HERE, "mi.txt"), "w") as f:
        f.write(f"# scikit-learn {sklearn.__version__}, numpy {np.__version__}\n")
        for name, m in [("binned", binned), ("gaussian", gauss)]:
            vals = " ".join(repr(float(v)) for v in m.ravel())
            f.write(f"{name} {m.shape[0]} {m.shape[1]} | {vals}\n")


if __name__ == "__main__":
    main()
