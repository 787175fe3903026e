"""What the benchmarks share: the checkout's test data, the seed and batch size, and fixtures."""

from __future__ import annotations

import numpy as np

from model_backend.core.paths import CHECKOUT_ROOT, test_data_dir

ROOT = CHECKOUT_ROOT
DATA = test_data_dir()
SEED = 11
BATCH = 32
AGREEMENT_RASTERS = ("manila_oam_0.10m.tif", "florida_neon_0.10m.tif", "netherlands_aerial_0.25m_epsg28992.tif",
                     "bali_pix4d_0.35m_alpha.tif", "colorado_hro_0.15m_nodata.tif")


def augment(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """(n, D) fp16 unit vectors: rows of `base` picked at random, plus N(0, noise^2) per dimension."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float16)
    for s in range(0, n, 16384):
        m = min(16384, n - s)
        v = base[rng.integers(0, len(base), m)] + rng.standard_normal((m, base.shape[1]), dtype=np.float32) * noise
        out[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out
