"""Weight-space interpolation between two points of one fine-tuning run.

A fine-tune that teaches one skill (here: top-1 routing among same-format needles) erodes another
that the starting weights had (copying long values). When both points lie in one basin, the
straight line between them often keeps much of each (WiSE-FT, Wortsman et al. 2022):
`start + keep·(end - start)`. Not yet measured on this project's runs (BUILD_NOTES.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def interpolate(start, end, keep: float):
  """`start + keep·(end - start)` leaf by leaf, for two pytrees of one structure.

  keep = 0 gives `start`, keep = 1 gives `end`; each leaf keeps its dtype (the blend is computed
  in float32 or wider).
  """
  keep = float(keep)
  if not (math.isfinite(keep) and 0.0 <= keep <= 1.0):
    raise ValueError(f"keep must lie in [0, 1], got {keep}")
  s_leaves, s_def = jax.tree.flatten(start)
  e_leaves, e_def = jax.tree.flatten(end)
  if s_def != e_def:
    raise ValueError(f"the two pytrees differ in structure: {s_def} vs {e_def}")
  out = []
  for path_leaf, a, b in zip(jax.tree_util.tree_flatten_with_path(start)[0], s_leaves, e_leaves):
    name = jax.tree_util.keystr(path_leaf[0])
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name}: cannot interpolate {a.dtype} weights")
    wide = jnp.promote_types(a.dtype, jnp.float32)
    a32, b32 = a.astype(wide), b.astype(wide)
    out.append((a32 + keep * (b32 - a32)).astype(a.dtype))
  return jax.tree.unflatten(s_def, out)
