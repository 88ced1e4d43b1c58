"""Fused routing scores over a memory bank (SPEC §6), tile by tile over the chunks.

For routing queries q [B, T, N, H] and a bank of L2-normalised routing keys [C, K, H] (GQA: query
head n reads kv head n // G, G = N / K), the score of chunk c for sample b is

    s[b, c] = Rq_t( Rh_n( scale · <q[b, t, n], keys[c, n // G]> ) )

with Rh the head reduction (mean | max over N) and Rq the query reduction over the routing tokens
query_mask[b, t] (max | mean | last). Invalid chunks (chunk_valid[c] false) and samples without a
routing token score -inf. The kernel never materialises [B, T, N, C]: each grid step reads one
tile of `block_c` chunks and writes their [B, block_c] scores.

Layout choices (they are what makes the scan memory-bound rather than compute-bound):
- keys are passed flattened, [C, K·H] (a free reshape): a tile is one contiguous slab.
- head mean: Σ_n <q_n, k_{n//G}> / N = Σ_k <Σ_g q_{k,g}, k_k> / N, so the G query heads of each
  kv head are summed (and scaled) outside the kernel; the kernel then does K dots of
  [block_c, H] x [H, T] (keys-as-LHS: the chunk tile is the MMA M side, tokens the N side).
- head max: one dot per query head, running max.
- the query reduction is a weighted sum or a masked max with weights w [B, T] prepared outside:
  0/1 mask (max), 1/count (mean), one-hot of the last routing token (last).
- the scale (and 1/N for mean) is folded into q, so any sign of scale is handled exactly.

Order of this file (as jax's Pallas ops): tile config → kernel body → pallas_call wrapper →
jitted public function → `routing_scores_reference` in plain jnp.

GPU notes (not run on a GPU in this repo yet; see pallas_kernels/gpu_check.py):
- Every in-kernel array shape is a power of 2: block_c, the padded token count Tp (≥ 16 for the
  Triton dot), the padded batch Bp and H (64/128 in practice). K·H need not be (it is only sliced).
- The bank is never padded: the grid covers the C // block_c full tiles of the unpadded keys and
  the remainder (< block_c chunks) is scored by a second one-tile call on a zero-padded copy of
  just those rows, so no block ever reads past the end of the bank (Triton does not mask block
  loads for us).
- Lowered through the Triton backend (see `_compat.py`). tests/pallas/test_gpu_lowering.py runs
  that lowering on CPU (`lowering_platforms=("cuda",)`); PTX compilation and running need a GPU.
  The default Mosaic GPU lowering of this pallas_call fails (the keys block exceeds SMEM at
  block_c=128 x K·H=1024; with smaller tiles, the 64-byte query-weight block is rejected: Mosaic
  copies must be multiples of 128 bytes); a
  Mosaic port would stage keys with `plgpu.emit_pipeline` and use `plgpu.wgmma` on swizzled
  SMEM tiles (keys tile as M = 64·m, Tp as N).
- float32 banks use full-precision dots (Triton's float32 default is TF32).
- Not fused (yet): the chunk -> document max and a per-tile top-k. The [B, C] float32 scores the
  kernel writes are 4 bytes per chunk per sample against 256 (tiny model) to 2048 (MSA-4B) bytes
  of keys read, so the fusion would save at most 0.2-1.6% of the traffic;
  `msa_jax.ops.bank_top_k_docs` does the exact reduction after the scan.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from msa_jax.config import HeadReduce, QueryReduce
from pallas_kernels import _compat

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class RoutingScoresConfig:
  """Tunables of the routing-score kernel (all static).

  block_c: chunks per grid step (MMA M side); a power of 2.
  min_block_t: routing tokens are zero-padded to a power of 2 at least this (MMA N side; Triton's
    dot needs 16).
  num_warps, num_stages: Triton launch parameters (GPU only).
  """

  block_c: int = 256
  min_block_t: int = 16
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if not _compat.is_power_of_2(self.block_c):
      raise ValueError(f"{self.block_c=} must be a power of 2")
    if not _compat.is_power_of_2(self.min_block_t):
      raise ValueError(f"{self.min_block_t=} must be a power of 2")
    if self.num_warps < 1 or not _compat.is_power_of_2(self.num_warps):
      raise ValueError(f"{self.num_warps=} must be a power of 2")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")


# --- kernel body --------------------------------------------------------------------------------

def _routing_scores_kernel(
    keys_ref,  # [block_c, K*H] routing keys of this tile (bank dtype)
    q_ref,  # [Bp, R, Tp, H] routing queries, scale folded in (R = K pre-summed, or N)
    w_ref,  # [Bp, Tp] float32 query weights (0/1 mask | 1/count | one-hot last)
    valid_ref,  # [block_c] int32 chunk validity (nonzero = valid)
    o_ref,  # [Bp, block_c] float32 chunk scores
    *,
    head_dim: int,
    groups: int,
    head_max: bool,
    query_max: bool,
):
  bp, r, _, _ = q_ref.shape
  num_kv = r // groups if head_max else r
  # kv head outer, sample inner: one [block_c, H] key slice is live at a time (on GPU it is the
  # MMA's A operand) and each sample keeps one [block_c, Tp] float32 accumulator.
  # float32 banks: full-precision dots (Triton's default for float32 is TF32, ~1e-3 relative).
  precision = lax.Precision.HIGHEST if keys_ref.dtype == jnp.float32 else None
  acc = [None] * bp  # per sample: head-reduced scores [block_c, Tp] of every routing token
  for kv in range(num_kv):
    kt = keys_ref[:, pl.ds(kv * head_dim, head_dim)]  # [block_c, H]
    for b in range(bp):
      for j in (range(kv * groups, (kv + 1) * groups) if head_max else (kv,)):
        sj = lax.dot_general(kt, q_ref[b, j], (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [block_c, Tp]
        if acc[b] is None:
          acc[b] = sj
        else:
          acc[b] = jnp.maximum(acc[b], sj) if head_max else acc[b] + sj
  valid = valid_ref[...] != 0  # [block_c]
  for b in range(bp):
    w = w_ref[b, :]  # [Tp]
    if query_max:
      red = jnp.max(jnp.where(w[None, :] > 0, acc[b], NEG_INF), axis=1)  # [block_c]
    else:
      red = jnp.sum(acc[b] * w[None, :], axis=1)  # [block_c]
    has_query = jnp.max(w) > 0
    o_ref[b, :] = jnp.where(valid & has_query, red, NEG_INF)


# --- pallas_call wrapper ------------------------------------------------------------------------

def _routing_scores_call(keys2d, q, w, valid, *, num_tiles: int, head_dim: int, groups: int,
                         head_max: bool, query_max: bool, config: RoutingScoresConfig,
                         interpret: bool) -> jax.Array:
  """Scores of the first num_tiles·block_c rows of keys2d [C', K·H] -> [Bp, num_tiles·block_c]."""
  _, kh = keys2d.shape
  bp, r, tp, h = q.shape
  bc = config.block_c
  kernel = functools.partial(_routing_scores_kernel, head_dim=head_dim, groups=groups,
                             head_max=head_max, query_max=query_max)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((bp, num_tiles * bc), jnp.float32),
      grid=(num_tiles,),
      in_specs=[
          pl.BlockSpec((bc, kh), lambda i: (i, 0)),  # keys: tile i of the bank
          pl.BlockSpec((bp, r, tp, h), lambda i: (0, 0, 0, 0)),  # queries: resident
          pl.BlockSpec((bp, tp), lambda i: (0, 0)),  # query weights: resident
          pl.BlockSpec((bc,), lambda i: (i,)),  # chunk validity of tile i
      ],
      out_specs=pl.BlockSpec((bp, bc), lambda i: (0, i)),  # scores of tile i
      compiler_params=_compat.compiler_params(interpret=interpret, num_warps=config.num_warps,
                                              num_stages=config.num_stages),
      interpret=interpret,
      name="msa_routing_scores",
  )(keys2d, q, w, valid)


def prepare_queries(q: jax.Array, query_mask: jax.Array, scale, *, num_kv_heads: int,
                    head_reduce: HeadReduce, query_reduce: QueryReduce,
                    dtype) -> tuple[jax.Array, jax.Array]:
  """Queries and query weights in kernel layout (unpadded).

  Returns q' [B, R, T, H] in `dtype` (R = K with each GQA group summed and divided by N for head
  mean, R = N for head max; scale folded in) and weights w [B, T] float32: the 0/1 routing mask
  (query max), mask / count (mean), or a one-hot of the last routing token (last); all zero for a
  row without routing tokens.
  """
  b, t, n, h = q.shape
  qf = q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
  if head_reduce is HeadReduce.MEAN:
    qf = qf.reshape(b, t, num_kv_heads, n // num_kv_heads, h).sum(axis=3) / n  # B T K H
  qr = jnp.transpose(qf, (0, 2, 1, 3)).astype(dtype)  # B R T H
  m = query_mask.astype(bool)
  if query_reduce is QueryReduce.MAX:
    w = m.astype(jnp.float32)
  elif query_reduce is QueryReduce.MEAN:
    w = m.astype(jnp.float32) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1)
  else:  # LAST: the routing token with the highest index
    last = jnp.max(jnp.where(m, jnp.arange(t), -1), axis=1)  # B
    w = (jnp.arange(t)[None, :] == last[:, None]).astype(jnp.float32)
  return qr, w


# --- public function ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("head_reduce", "query_reduce", "config",
                                             "interpret"))
def routing_scores(q: jax.Array, query_mask: jax.Array, keys: jax.Array, chunk_valid: jax.Array,
                   scale, *, head_reduce: HeadReduce, query_reduce: QueryReduce,
                   config: RoutingScoresConfig = RoutingScoresConfig(),
                   interpret: bool = False) -> jax.Array:
  """Per-chunk routing scores [B, C] float32 (-inf: invalid chunk, or no routing token).

  Args:
    q: [B, T, N, H] routing queries (normalised if the score is a cosine).
    query_mask: [B, T] bool, the routing tokens.
    keys: [C, K, H] bank routing keys (float32 or bfloat16). The dots run in keys.dtype with
      float32 accumulation, so q is rounded to keys.dtype after the group sum.
    chunk_valid: [C] bool (or int, nonzero = valid).
    scale: score scale (traced; any sign).
    head_reduce, query_reduce: the reductions (static).
    config: tile sizes (static).
    interpret: run the kernel in the Pallas interpreter (CPU).
  """
  b, t, n, h = q.shape
  c, k, hk = keys.shape
  if hk != h or n % k:
    raise ValueError(f"q {q.shape} does not match keys {keys.shape} (need H equal, N % K == 0)")
  if query_mask.shape != (b, t) or chunk_valid.shape != (c,):
    raise ValueError(f"query_mask {query_mask.shape} / chunk_valid {chunk_valid.shape} do not "
                     f"match B={b}, T={t}, C={c}")
  groups = n // k
  head_max = head_reduce is HeadReduce.MAX
  qr, w = prepare_queries(q, query_mask, scale, num_kv_heads=k, head_reduce=head_reduce,
                          query_reduce=query_reduce, dtype=keys.dtype)
  bp = _compat.next_power_of_2(b)
  tp = max(_compat.next_power_of_2(t), config.min_block_t)
  qr = jnp.pad(qr, [(0, bp - b), (0, 0), (0, tp - t), (0, 0)])  # Bp R Tp H
  w = jnp.pad(w, [(0, bp - b), (0, tp - t)])  # Bp Tp
  keys2d = keys.reshape(c, k * h)  # C K·H (free)
  valid = chunk_valid.astype(jnp.int32)
  call = functools.partial(_routing_scores_call, head_dim=h, groups=groups, head_max=head_max,
                           query_max=query_reduce is QueryReduce.MAX, config=config,
                           interpret=interpret)
  bc = config.block_c
  num_full, rem = divmod(c, bc)
  parts = []
  if num_full:
    parts.append(call(keys2d, qr, w, valid, num_tiles=num_full))  # Bp num_full·bc
  if rem:
    # The last partial tile: copy just those rows into one zero-padded tile (invalid padding).
    tail_keys = jnp.pad(keys2d[num_full * bc:], [(0, bc - rem), (0, 0)])
    tail_valid = jnp.pad(valid[num_full * bc:], [(0, bc - rem)])
    parts.append(call(tail_keys, qr, w, tail_valid, num_tiles=1)[:, :rem])  # Bp rem
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return out[:b]


# --- reference ----------------------------------------------------------------------------------

def routing_scores_reference(q: jax.Array, query_mask: jax.Array, keys: jax.Array,
                             chunk_valid: jax.Array, scale, *, head_reduce: HeadReduce,
                             query_reduce: QueryReduce) -> jax.Array:
  """Plain-jnp reference: materialises every per-head score [B, T, N, C] in float32."""
  b, t, n, h = q.shape
  c, k, _ = keys.shape
  kn = jnp.repeat(keys.astype(jnp.float32), n // k, axis=1)  # C N H: query head n -> kv n // G
  s = jnp.einsum("btnh,cnh->btnc", q.astype(jnp.float32), kn,
                 precision=lax.Precision.HIGHEST) * scale  # B T N C
  s = jnp.mean(s, axis=2) if head_reduce is HeadReduce.MEAN else jnp.max(s, axis=2)  # B T C
  m = query_mask.astype(bool)
  if query_reduce is QueryReduce.MAX:
    r = jnp.max(jnp.where(m[:, :, None], s, NEG_INF), axis=1)
  elif query_reduce is QueryReduce.MEAN:
    r = jnp.sum(jnp.where(m[:, :, None], s, 0.0), axis=1) / jnp.maximum(m.sum(1), 1)[:, None]
  else:
    last = jnp.max(jnp.where(m, jnp.arange(t), -1), axis=1)
    r = s[jnp.arange(b), jnp.maximum(last, 0)]  # B C
  ok = jnp.any(m, axis=1)[:, None] & chunk_valid.astype(bool)[None, :]
  return jnp.where(ok, r, NEG_INF)
