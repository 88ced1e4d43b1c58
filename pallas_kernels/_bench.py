"""Timing helper shared by the kernel benchmarks and the GPU check."""

import time

import jax
import numpy as np


def timeit(fn, *args, repeats: int, warmup: int = 1) -> float:
  """Median seconds of fn(*args) (blocked on the result), after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))
