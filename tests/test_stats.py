"""equiopt.train.stats.welch_p against Welch's formula written out (t statistic and
Welch-Satterthwaite degrees of freedom, float64), and its edge cases."""

import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from equiopt.train.stats import welch_p


def _welch_by_formula(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * student_t.sf(abs(t), df)


@pytest.mark.parametrize(
    "a, b",
    [
        ([3.353, 3.360, 3.347], [3.354, 3.365, 3.343]),  # overlapping seeds: large p
        ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]),  # separated: small p
        ([5.0, 5.2], [4.0, 4.1, 4.05, 4.2]),  # unequal sizes and variances
    ],
)
def test_welch_p_equals_the_formula(a, b):
    # both sides are float64 evaluations of the same closed form: agreement to 1e-9 relative
    assert welch_p(a, b) == pytest.approx(_welch_by_formula(a, b), rel=1e-9)
    assert welch_p(a, b) == pytest.approx(welch_p(b, a), rel=1e-12)  # two-sided


def test_welch_p_edge_cases():
    assert welch_p([1.0], [2.0, 3.0]) is None  # fewer than two on a side
    assert welch_p([1.0, float("nan")], [2.0, 3.0]) is None  # the non-finite value is left out
    assert welch_p([1.0, 1.2, float("inf")], [2.0, 2.1, 1.9]) == pytest.approx(welch_p([1.0, 1.2], [2.0, 2.1, 1.9]))
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0  # identical constants: nothing to detect
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0  # zero spread, a gap
