"""Shims for Pallas APIs that differ between the jax versions we support (0.10 and 0.11).

- GPU backend choice. In jax 0.10+, `pl.pallas_call` without compiler params lowers through
  Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True), whose lowering has no rule for a plain
  `dot_general` (matmuls there go through `plgpu.wgmma`/tcgen05 with swizzled SMEM operands) nor
  for vector-indexed gathers. Our kernels use portable `pl.*` ops and BlockSpecs, which lower
  through the Triton backend; it is selected by passing Triton compiler params. The Triton backend
  is deprecated in jax 0.11 but still present; if it disappears, `gpu_compiler_params` returns None
  and the call falls back to the default backend (and then needs a Mosaic GPU port, see the
  kernel docstrings).
- Interpret mode ignores compiler params; we pass none there.
"""

from __future__ import annotations

from typing import Any


def gpu_compiler_params(*, num_warps: int, num_stages: int) -> Any | None:
  """Triton compiler params (selects the Triton lowering on GPU), or None if it is gone."""
  try:
    from jax.experimental.pallas import triton as pltriton  # jax 0.10 / 0.11
  except ImportError:  # pragma: no cover - a future jax without the Triton backend
    return None
  params_cls = getattr(pltriton, "CompilerParams", None) or getattr(
      pltriton, "TritonCompilerParams", None)
  if params_cls is None:  # pragma: no cover
    return None
  return params_cls(num_warps=num_warps, num_stages=num_stages)


def compiler_params(*, interpret: bool, num_warps: int, num_stages: int) -> Any | None:
  return None if interpret else gpu_compiler_params(num_warps=num_warps, num_stages=num_stages)


def next_power_of_2(n: int) -> int:
  """Smallest power of 2 >= max(n, 1)."""
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_power_of_2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0
