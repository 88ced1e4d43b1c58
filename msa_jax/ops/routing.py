"""Routing over a memory bank: chunk scores of every bank chunk, then the top-k documents.

`bank_chunk_scores` is `msa_jax.math.routing.chunk_scores` for one bank shared by the batch
(keys [C, K, H] instead of [B, C, K, H]) with an `implementation=` choice:

- "xla" (default off GPU): the formulation that is fast on XLA:CPU (performance_notes A6). Keys
  are normalised per head offline, so head mean is one dot over the flattened K·H dim with the
  query heads of each GQA group pre-summed; head max is one dot against block-diagonal queries
  (each kv head's queries only see that head's slice of K·H); linear query reductions (mean,
  last) are applied to the queries. With one query row the queries are the dot's LHS
  (`q · keysᵀ`, streaming the bank at about read bandwidth); with more, the keys are
  (`keys · qᵀ -> [C, rows]`), which XLA:CPU fuses with the max over rows into one YNNPACK
  fusion that never materialises [C, rows] (see `ScanConfig`).
- "pallas" (default on GPU): the fused kernel in pallas_kernels/routing_scores (interpret mode
  off GPU).

`bank_top_k_docs` is `doc_scores` + `select_top_k` for a bank, without the chunk → document
scatter on the hot path (segment_max over 1.56M chunks costs about half the scan on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce
from msa_jax.math import routing
from msa_jax.ops import _dispatch

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """How the "xla" path scans the bank.

  gemv_max_rows: query rows (B·R, see `_query_rows`) up to which the queries are the dot's LHS
    (`q · keysᵀ`, output [rows, C]); above it the keys are the LHS (`keys · qᵀ`, output [C, rows],
    reduced over rows in the same fusion). Measured on XLA:CPU with bf16 keys, 1.56M x 128: one
    row, q-as-LHS streams at ~100% of read bandwidth and keys-as-LHS is 15x slower (it upcasts the
    bank to float32); from two rows on, q-as-LHS is 5-7x slower than keys-as-LHS. Hence 1.
  tile_c: None scans the bank in one dot. XLA:CPU fuses that dot with the max over rows into one
    YNNPACK fusion that streams the bank without materialising [C, rows]; slicing the bank into
    tiles makes it upcast every slice to float32 (a copy) and runs 2-5x slower, so tiling is off
    by default. An int tiles the keys-as-LHS scan into slices of tile_c chunks (for backends
    without that fusion, to bound the [tile_c, rows] temporary).

  per_sample_min_rows: with B > 1 and at least this many rows per sample, scan the bank once per
    sample (a dot plus a max over all of its output columns) instead of once for the batch with a
    max over each sample's slice of the columns, which XLA:CPU's fusion runs ~1.5x slower than B
    separate passes once the scan is compute-bound (B=4 x 16 rows vs B=1 x 64 rows). Below it the
    scan is memory-bound and one pass for the batch wins.
  """

  gemv_max_rows: int = 1
  tile_c: int | None = None
  per_sample_min_rows: int = 16

  def __post_init__(self):
    if self.gemv_max_rows < 0:
      raise ValueError(f"{self.gemv_max_rows=} must be >= 0")
    if self.per_sample_min_rows < 1:
      raise ValueError(f"{self.per_sample_min_rows=} must be >= 1")
    if self.tile_c is not None and self.tile_c < 1:
      raise ValueError(f"{self.tile_c=} must be >= 1 (or None)")


def _query_rows(q: jax.Array, query_mask: jax.Array, scale, num_kv_heads: int,
                head_reduce: HeadReduce, query_reduce: QueryReduce, dtype) -> tuple[jax.Array, int]:
  """The query rows whose dots with a flattened key give the chunk score by a max over rows.

  Returns (rows [B, R, K·H] in `dtype`, then_mean_over): the score of a chunk for sample b is
  max over its R rows of <row, key> — except for (head max, query mean), where the rows are
  (token, head) pairs and the score is max over the N heads, then the mean over tokens
  (then_mean_over = T; else 0). Linear reductions are applied to the queries, not the scores:

  - head mean: Σ_n <q_n, k_{n//G}> / N = <concat_k(Σ_g q_{k,g}) / N, k_flat> (keys normalised per
    head offline make the cosine a dot), one row per token;
  - head max: block-diagonal rows, row (t, n) holds q[t, n] in kv head n//G's columns, zeros
    elsewhere, so its dot with the flattened key is exactly that head's score;
  - query mean (head mean): the masked mean of the token rows (one row); query last: the last
    routing token's rows; query max: every token's rows, with non-routing tokens replaced by a
    routing token's (a duplicate never changes a max), so no mask is applied to the scores.
  The scale is folded into q, so any sign is exact. Rows of samples without a routing token are
  arbitrary; the caller masks those samples to -inf.
  """
  b, t, n, h = q.shape
  k, g = num_kv_heads, n // num_kv_heads
  m = query_mask.astype(bool)
  qf = q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
  if head_reduce is HeadReduce.MEAN:
    rows = (qf.reshape(b, t, k, g, h).sum(axis=3) / n).reshape(b, t, 1, k * h)  # B T 1 K·H
  else:
    eye = jnp.eye(k, dtype=jnp.float32)
    rows = jnp.einsum("btkgh,kj->btkgjh", qf.reshape(b, t, k, g, h), eye)
    rows = rows.reshape(b, t, n, k * h)  # B T N K·H, block-diagonal
  per_token = rows.shape[2]
  if query_reduce is QueryReduce.LAST:
    last = jnp.max(jnp.where(m, jnp.arange(t), -1), axis=1)  # B
    rows = jnp.take_along_axis(rows, jnp.maximum(last, 0)[:, None, None, None], axis=1)
    return rows.reshape(b, per_token, k * h).astype(dtype), 0
  if query_reduce is QueryReduce.MEAN and head_reduce is HeadReduce.MEAN:
    w = m.astype(jnp.float32) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1)  # B T
    rows = jnp.einsum("bt,btrd->brd", w, rows)  # B 1 K·H
    return rows.astype(dtype), 0
  if query_reduce is QueryReduce.MAX:
    first = jnp.argmax(m, axis=1)  # B: a routing token (0 if none)
    fill = jnp.take_along_axis(rows, first[:, None, None, None], axis=1)  # B 1 r K·H
    rows = jnp.where(m[:, :, None, None], rows, fill)
    return rows.reshape(b, t * per_token, k * h).astype(dtype), 0
  return rows.reshape(b, t * per_token, k * h).astype(dtype), t  # head max, query mean


def _as_matrix(x: jax.Array) -> jax.Array:
  """x [R, D] as a genuinely two-dimensional buffer (exact: a dot with the identity).

  XLA:CPU emits `q · keysᵀ` with a few query rows as a loop fusion. When q reaches it as a bitcast
  of a higher-rank buffer (a reshape of [B, T, ..., H], as every q here is), the fusion
  re-linearises q's index per element and runs 3-4x slower (140 vs 40 ms over 1.56M x 128 bf16
  keys); an optimization_barrier does not help (the bitcast moves past it). A dot produces a
  plain [R, D] buffer.
  """
  eye = jnp.eye(x.shape[1], dtype=jnp.float32)
  return jnp.dot(x.astype(jnp.float32), eye, precision=lax.Precision.HIGHEST).astype(x.dtype)


def _xla_chunk_scores(q, query_mask, keys, chunk_valid, scale, *, head_reduce: HeadReduce,
                      query_reduce: QueryReduce, scan: ScanConfig) -> jax.Array:
  b, t, n, h = q.shape
  c, k, _ = keys.shape
  rows, mean_over = _query_rows(q, query_mask, scale, k, head_reduce, query_reduce, keys.dtype)
  r = rows.shape[1]
  if b > 1 and r >= scan.per_sample_min_rows:
    return jnp.concatenate([
        _xla_chunk_scores(q[i:i + 1], query_mask[i:i + 1], keys, chunk_valid, scale,
                          head_reduce=head_reduce, query_reduce=query_reduce, scan=scan)
        for i in range(b)], axis=0)  # B C
  qmat = rows.reshape(b * r, k * h)  # B·R K·H
  keys2d = keys.reshape(c, k * h)  # C K·H (free)
  m = query_mask.astype(bool)
  w = m.astype(jnp.float32) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1)  # B T

  if b * r <= scan.gemv_max_rows:
    # Queries as LHS: [B·R, K·H] · [C, K·H]ᵀ -> [B·R, C]: one streaming pass over the bank.
    s = jnp.dot(_as_matrix(qmat), keys2d.T, preferred_element_type=jnp.float32)
    if mean_over:  # head max, then the mean over routing tokens
      s = jnp.max(s.reshape(b, t, n, c), axis=2)  # B T C
      out = jnp.sum(s * w[:, :, None], axis=1)  # B C
    else:
      out = jnp.max(s.reshape(b, r, c), axis=1)  # B C
  else:
    # Keys as LHS: [C, K·H] · [B·R, K·H]ᵀ -> [C, B·R], reduced over R per sample.
    def score(kt):  # [c, K·H] -> [c, B]
      s = lax.dot_general(kt, qmat, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      if mean_over:
        s = jnp.max(s.reshape(kt.shape[0], b, t, n), axis=3)  # c B T
        return jnp.sum(s * w[None], axis=2)
      return jnp.max(s.reshape(kt.shape[0], b, r), axis=2)

    if scan.tile_c is None or c <= scan.tile_c:
      out = score(keys2d).T  # B C
    else:
      out = jnp.concatenate([score(keys2d[i:i + scan.tile_c]) for i in range(0, c, scan.tile_c)],
                            axis=0).T
  ok = jnp.any(m, axis=1)[:, None] & chunk_valid.astype(bool)[None, :]  # B C
  return jnp.where(ok, out, NEG_INF)


@functools.partial(jax.jit, static_argnames=("head_reduce", "query_reduce", "implementation",
                                             "scan", "pallas_config"))
def bank_chunk_scores(q: jax.Array, query_mask: jax.Array, keys: jax.Array, chunk_valid: jax.Array,
                      *, scale, head_reduce: HeadReduce, query_reduce: QueryReduce,
                      implementation: _dispatch.Implementation | None = None,
                      scan: ScanConfig = ScanConfig(), pallas_config=None) -> jax.Array:
  """Score of every bank chunk for each sample: [B, C] float32.

  Args:
    q: [B, T, N, H] routing queries (normalised if the score is a cosine).
    query_mask: [B, T] bool, the routing tokens.
    keys: [C, K, H] bank routing keys, normalised per head (float32 or bfloat16). The dots run
      in keys.dtype with float32 accumulation: q is rounded to keys.dtype after the group sum.
    chunk_valid: [C] bool.
    scale: score scale (traced).
    head_reduce, query_reduce: the reductions.
    implementation: "xla" | "pallas" | None (= "pallas" on GPU, "xla" elsewhere).
    scan: tiling of the "xla" path. pallas_config: a RoutingScoresConfig for "pallas".

  Returns:
    [B, C] scores; -inf for invalid chunks and for samples without routing tokens. Equals
    `msa_jax.math.routing.chunk_scores` with the bank broadcast over the batch, up to the
    rounding of q to keys.dtype.
  """
  if _dispatch.resolve(implementation) == "pallas":
    from pallas_kernels.routing_scores import RoutingScoresConfig, routing_scores
    return routing_scores(q, query_mask, keys, chunk_valid, scale, head_reduce=head_reduce,
                          query_reduce=query_reduce,
                          config=pallas_config or RoutingScoresConfig(),
                          interpret=_dispatch.interpret())
  return _xla_chunk_scores(q, query_mask, keys, chunk_valid, scale, head_reduce=head_reduce,
                           query_reduce=query_reduce, scan=scan)


# --- chunk -> document reduction and top-k ------------------------------------------------------

def _exact_top_k_docs(chunk_scores, chunk_doc, num_docs, k, chunk_reduce):
  cd = jnp.broadcast_to(chunk_doc[None], chunk_scores.shape)
  return routing.select_top_k(routing.doc_scores(chunk_scores, cd, num_docs, chunk_reduce), k)


def _block_size(c: int) -> int:
  """Chunks per block of the top-k prefilter: a divisor of C in [16, 64] nearest 32, else 32.

  A divisor lets the block max be a plain reshape + reduce (~0.5 ms over 1.56M float32 on CPU);
  slicing off a remainder first makes XLA:CPU's reduce 4x slower, so C is padded instead.
  """
  divisors = [g for g in range(16, 65) if c % g == 0]
  return min(divisors, key=lambda g: abs(g - 32)) if divisors else 32


def _top_chunks(scores: jax.Array, valid: jax.Array, l: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The top l chunk scores of where(valid, scores, -inf) [B, C] per row, via blocks.

  A full `lax.top_k` over C costs ~2-4 ms at 1.56M chunks on CPU whatever l is. Instead: the max
  of each block of g consecutive chunks (one fused read of s), `top_k` over the C/g block maxima
  for the best min(l, blocks) blocks, then `top_k` over their chunks. Every chunk that beats the
  l-th best block max lies in one of those blocks, so the result is the true top l unless the
  l-th value ties with or falls below that block max; the returned threshold θ (the larger of
  the two) certifies what is exact.

  Returns (values [B, l] descending, chunk indices [B, l], θ [B]): every valid chunk scoring above
  θ is among the returned ones.
  """
  b, c = scores.shape
  g = _block_size(c)
  # Block maxima of the unmasked scores: an upper bound of the masked ones, so still a valid
  # prefilter, and 4-6x faster on XLA:CPU than fusing the mask into the reduce. (Invalid chunks
  # are normally -inf already: bank_chunk_scores masks them.)
  s = scores
  if c % g:
    s = jnp.pad(s, [(0, 0), (0, g - c % g)], constant_values=NEG_INF)
  nbt = s.shape[1] // g
  bmax = jnp.max(s.reshape(b, nbt, g), axis=2)  # B blocks
  lb = min(l, nbt)
  bvals, bidx = lax.top_k(bmax, lb)  # B lb
  cidx = (bidx[:, :, None] * g + jnp.arange(g)).reshape(b, lb * g)  # B lb·g
  inside = cidx < c  # the padding of the last block
  cidx = jnp.minimum(cidx, c - 1)
  cand = jnp.where(inside & valid[cidx], jnp.take_along_axis(scores, cidx, axis=1), NEG_INF)
  vals, j = lax.top_k(cand, l)
  idx = jnp.take_along_axis(cidx, j, axis=1)
  # θ: min, not vals[:, -1] — XLA:CPU rewrites a slice of top_k's output into a full sort.
  theta = jnp.min(vals, axis=1)
  if lb < nbt:
    theta = jnp.maximum(theta, jnp.min(bvals, axis=1))
  return vals, idx, theta


@functools.partial(jax.jit, static_argnames=("num_docs", "k", "max_chunks_per_doc",
                                             "chunk_reduce"))
def bank_top_k_docs(chunk_scores: jax.Array, chunk_doc: jax.Array, num_docs: int, k: int,
                    max_chunks_per_doc: int, chunk_reduce: ChunkReduce
                    ) -> tuple[jax.Array, jax.Array]:
  """The top-k documents of each sample from its chunk scores.

  Same result as `routing.select_top_k(routing.doc_scores(chunk_scores, chunk_doc, num_docs,
  chunk_reduce), k)` with chunk_doc broadcast over the batch: document ids [B, k] int32 in
  descending score (ties to the lower id), -1 past the selectable ones, and their scores [B, k]
  (-inf where the id is -1). Document ids follow `doc_scores`: 0 and ids >= num_docs are not
  documents.

  Args:
    chunk_scores: [B, C] float32 (-inf = not selectable).
    chunk_doc: [C] int, the document of each bank chunk.
    num_docs: M, static.
    k: documents to select, static.
    max_chunks_per_doc: Cmax, an upper bound on any document's chunk count (static). Only the
      speed depends on it being right: a wrong bound is detected and falls back to the exact path.
    chunk_reduce: MAX uses the chunk-level shortcut below; MEAN uses segment sums.

  MAX shortcut (exact, no scatter): take the top L = k·Cmax + 1 chunk scores (`_top_chunks`:
  block maxima, then top-k of the best blocks' chunks), keep each document's best chunk (sort the
  L candidates by document), and pick the top-k of those, ties to the lower id. Every document
  scoring above the certified threshold θ has its best chunk among the candidates, with its
  exact score, so the answer is exact whenever the k-th pick scores strictly above θ (L chunks
  span at least k + 1 documents, so without ties it always does), or θ = -inf (every selectable
  chunk is a candidate). Otherwise — a tie at θ, or a wrong Cmax — the batch falls back to the
  exact segment_max path under `lax.cond`. About 1 ms at 1.56M chunks on CPU, vs 4-9 ms for
  segment_max + top_k.
  """
  b, c = chunk_scores.shape
  if chunk_reduce is ChunkReduce.MEAN:
    return _exact_top_k_docs(chunk_scores, chunk_doc, num_docs, k, chunk_reduce)
  l = k * max_chunks_per_doc + 1
  if l >= c:  # small bank: the candidates would be every chunk anyway
    return _exact_top_k_docs(chunk_scores, chunk_doc, num_docs, k, chunk_reduce)

  ids, scores, exact = _shortcut_top_k_docs(chunk_scores, chunk_doc, num_docs, k, l)
  return lax.cond(jnp.all(exact), lambda: (ids, scores),
                  lambda: _exact_top_k_docs(chunk_scores, chunk_doc, num_docs, k, chunk_reduce))


def _shortcut_top_k_docs(chunk_scores, chunk_doc, num_docs: int, k: int, l: int):
  """Top-k documents (chunk reduce max) from the top l chunks: (ids, scores, exact [B])."""
  b = chunk_scores.shape[0]
  chunk_doc = chunk_doc.astype(jnp.int32)
  valid = (chunk_doc > 0) & (chunk_doc < num_docs)  # C
  vals, idx, tau = _top_chunks(chunk_scores, valid, l)  # B L descending; all valid chunks > τ
  docs = jnp.where(vals > NEG_INF, chunk_doc[idx], num_docs)  # num_docs: sentinel, sorts last
  # Sort the candidates by (document asc, score desc): each document's first entry is its max.
  docs_s, neg_s = lax.sort((docs, -vals), dimension=1, num_keys=2)
  first = jnp.concatenate([jnp.ones((b, 1), bool), docs_s[:, 1:] != docs_s[:, :-1]], axis=1)
  doc_score = jnp.where(first & (docs_s < num_docs), -neg_s, NEG_INF)  # B L, in doc order
  top_v, pos = lax.top_k(doc_score, k)  # ties -> lower position = lower document id
  top_ids = jnp.where(top_v > NEG_INF, jnp.take_along_axis(docs_s, pos, axis=1), -1)
  exact = (tau == NEG_INF) | (jnp.min(top_v, axis=1) > tau)
  return top_ids.astype(jnp.int32), top_v, exact
