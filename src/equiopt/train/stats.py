"""Significance tests shared by the reports (``report``, ``ddc_experiments``) and the
results scripts: one definition of the Welch p-value and its edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances; ``scipy.stats.ttest_ind(a, b,
    equal_var=False)``) of two seed samples. Non-finite values (a diverged run's loss) are left
    out; ``None`` with fewer than two finite values on a side. Two constant samples: 1.0 when
    they are equal (no difference to detect), 0.0 when they differ (zero spread, any gap)."""
    a = [x for x in a if math.isfinite(x)]
    b = [x for x in b if math.isfinite(x)]
    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    from scipy.stats import ttest_ind  # of the [train] extra; heavy: imported only when a test runs

    with warnings.catch_warnings():  # scipy warns when samples are nearly identical
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)
