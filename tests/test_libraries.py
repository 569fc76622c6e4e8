"""Library-backed helpers give the same answer as the reference they replaced."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fsct.partition import components


def _reference_components(regions: np.ndarray) -> np.ndarray:
    """Per value, scipy.ndimage's 4-connected labelling, made unique across values (0 stays 0)."""
    out = np.zeros(regions.shape, np.int64)
    n = 0
    for v in np.unique(regions[regions != 0]):
        lab, k = ndimage.label(regions == v)
        out[lab > 0] = lab[lab > 0] + n
        n += k
    return out


def _raster_order(labels: np.ndarray) -> np.ndarray:
    """Non-zero labels in the order of their first pixel."""
    flat = labels.ravel()
    ids, first = np.unique(flat[flat != 0], return_index=True)
    return ids[np.argsort(first)]


def test_components_match_scipy_per_value_labelling():
    rng = np.random.default_rng(0)
    for t in range(40):
        regions = rng.integers(0, int(rng.integers(2, 6)), (int(rng.integers(1, 40)), int(rng.integers(1, 40))))
        if t % 3 == 0:
            regions = regions + 1  # no background at all
        got, n = components(regions)
        assert got.dtype == np.int32 and n == int(got.max())
        ref = _reference_components(regions)
        pairs = np.unique(np.stack([got.ravel(), ref.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(got)) == len(np.unique(ref))  # the same regions
        np.testing.assert_array_equal(_raster_order(got), np.arange(1, n + 1))  # numbered in raster order
        assert ((got == 0) == (regions == 0)).all()
