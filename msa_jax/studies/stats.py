"""Summary statistics of per-question outcomes."""

from __future__ import annotations

import numpy as np


def string_match_all(prediction: str, references) -> float:
  """RULER's metric for one sample: the fraction of references contained in the prediction."""
  p = prediction.lower()
  return float(np.mean([r.lower() in p for r in references]))


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the prediction is the reference answer text (surrounding whitespace aside)."""
  return float(prediction.strip() == reference.strip())


def bootstrap_ci(values, *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the mean of `values` (n >= 1)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("no values")
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)
