"""Routing: chunk scores, the head / query / chunk reductions, and top-k document selection (SPEC §6).

All functions are pure and shape-static. Invalid entries are -inf, so a reduction never picks
padding, and a document with no chunks (or a sample with no routing token) is never selected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce

NEG_INF = -jnp.inf


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., N, H] -> [..., K, G, H]: query head h belongs to kv head h // G."""
  *lead, n, h = q.shape
  return q.reshape(*lead, num_kv_heads, n // num_kv_heads, h)


def token_chunk_scores(q: jax.Array, keys: jax.Array, scale: float) -> jax.Array:
  """Per-head scores s[b, t, n, c] = scale · <q[b,t,n], keys[b,c,n//G]>.

  q: [B, T, N, H] routing queries; keys: [B, C, K, H] pooled routing keys. Returns [B, T, N, C]
  in float32 (the reference path; it materialises every head's score).
  """
  qg = _grouped(q, keys.shape[-2])  # B T K G H
  s = jnp.einsum("btkgh,bckh->btkgc", qg, keys, preferred_element_type=jnp.float32)
  return (s * scale).reshape(q.shape[:3] + (keys.shape[1],))


def reduce_heads(s: jax.Array, how: HeadReduce) -> jax.Array:
  """[B, T, N, C] -> [B, T, C]: mean or max over query heads."""
  return jnp.mean(s, axis=2) if how is HeadReduce.MEAN else jnp.max(s, axis=2)


def smooth_max(s: jax.Array, valid: jax.Array, softness, axis: int) -> jax.Array:
  """max of s over `axis` where valid, or with softness τ > 0 the log-mean-exp τ·log mean exp(s/τ).

  The exact max sends gradient through one entry only; in training that lets a feature shared
  by every candidate (e.g. a question's template words, read before its key) win the max for all
  of them and starve the rest (BUILD_NOTES.md "routing's max reductions"). The log-mean-exp is a
  smooth max with gradient to every entry, lies between the mean (τ → ∞) and the max (τ → 0), and
  has no bias towards axes with more valid entries. softness may be a traced scalar; 0 gives the
  exact max. -inf where no entry is valid.
  """
  hard = jnp.max(jnp.where(valid, s, NEG_INF), axis=axis)
  if isinstance(softness, (int, float)) and softness == 0:
    return hard  # inference: no extra work
  any_valid = jnp.any(valid, axis=axis)
  tau = jnp.asarray(softness, jnp.float32)
  top = jax.lax.stop_gradient(jnp.where(any_valid, hard, 0.0))  # the usual LSE shift
  z = jnp.where(valid, s - jnp.expand_dims(top, axis), 0.0) / jnp.maximum(tau, 1e-6)
  total = jnp.sum(jnp.where(valid, jnp.exp(z), 0.0), axis=axis)
  count = jnp.maximum(jnp.sum(valid, axis=axis), 1)
  soft = top + tau * jnp.log(jnp.maximum(total, 1e-30) / count)
  return jnp.where(any_valid, jnp.where(tau > 0, soft, hard), NEG_INF)


def reduce_queries(s: jax.Array, query_mask: jax.Array, how: QueryReduce,
                   softness=0.0) -> jax.Array:
  """[B, T, C] -> [B, C] over the routing tokens (query_mask [B, T]); -inf when a row has none.

  softness > 0 smooths MAX into a log-mean-exp (`smooth_max`; training only, 0 = exact).
  """
  has_query = jnp.any(query_mask, axis=1)[:, None]  # B 1
  m = query_mask[:, :, None]
  if how is QueryReduce.MAX:
    out = smooth_max(s, jnp.broadcast_to(m, s.shape), softness, axis=1)
  elif how is QueryReduce.MEAN:
    n = jnp.maximum(jnp.sum(query_mask, axis=1), 1)[:, None]
    out = jnp.sum(jnp.where(m, s, 0.0), axis=1) / n
  else:  # LAST: the routing token with the highest sequence index
    t = query_mask.shape[1]
    last = jnp.max(jnp.where(query_mask, jnp.arange(t), -1), axis=1)  # B
    out = jnp.take_along_axis(s, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  return jnp.where(has_query, out, NEG_INF)


def chunk_scores(q: jax.Array, query_mask: jax.Array, keys: jax.Array, chunk_valid: jax.Array, *,
                 scale: float, head_reduce: HeadReduce, query_reduce: QueryReduce,
                 softness=0.0) -> jax.Array:
  """Score of each chunk for each sample: [B, C] (-inf for invalid chunks or no routing token).

  q [B, T, N, H] routing queries (already normalised if the score is a cosine), query_mask
  [B, T] marks routing tokens, keys [B, C, K, H] pooled routing keys, chunk_valid [B, C].
  """
  s = reduce_heads(token_chunk_scores(q, keys, scale), head_reduce)  # B T C
  s = reduce_queries(s, query_mask, query_reduce, softness)  # B C
  return jnp.where(chunk_valid, s, NEG_INF)


def doc_scores(chunk_score: jax.Array, chunk_doc: jax.Array, num_docs: int,
               how: ChunkReduce, softness=0.0) -> jax.Array:
  """Chunk -> document reduction: [B, C] scores with chunk_doc [B, C] ids -> [B, num_docs].

  Index = document id; id 0 and documents without chunks are -inf. Chunks with score -inf (no
  routing token) give -inf documents under both reductions. softness > 0 smooths MAX into a
  log-mean-exp over the document's finite chunks (`smooth_max`; training only, 0 = exact).
  """
  valid = (chunk_doc > 0) & (chunk_doc < num_docs)
  seg = jnp.where(valid, chunk_doc, num_docs)  # dropped
  if how is ChunkReduce.MAX:
    out = jax.vmap(lambda s, d: jax.ops.segment_max(s, d, num_docs))(
        jnp.where(valid, chunk_score, NEG_INF), seg)
    if not (isinstance(softness, (int, float)) and softness == 0):
      out = _segment_smooth_max(chunk_score, valid & (chunk_score > NEG_INF), seg, out, softness,
                                num_docs)
  else:
    sums = jax.vmap(lambda s, d: jax.ops.segment_sum(s, d, num_docs))(
        jnp.where(valid, chunk_score, 0.0), seg)
    counts = jax.vmap(lambda v, d: jax.ops.segment_sum(v, d, num_docs))(valid.astype(jnp.int32), seg)
    out = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), NEG_INF)
  present = jax.vmap(lambda v, d: jax.ops.segment_max(v, d, num_docs))(valid.astype(jnp.int32), seg)
  return jnp.where(present > 0, out, NEG_INF)


def _segment_smooth_max(score: jax.Array, valid: jax.Array, seg: jax.Array, hard: jax.Array,
                        softness, num_docs: int) -> jax.Array:
  """`smooth_max` over the chunks of each document: score/valid/seg [B, C], hard [B, num_docs]."""
  tau = jnp.asarray(softness, jnp.float32)
  top = jax.lax.stop_gradient(jnp.where(hard > NEG_INF, hard, 0.0))  # B M
  shift = jnp.take_along_axis(top, jnp.minimum(seg, num_docs - 1), axis=1)  # B C
  z = jnp.where(valid, score - shift, 0.0) / jnp.maximum(tau, 1e-6)
  e = jnp.where(valid, jnp.exp(z), 0.0)
  total = jax.vmap(lambda x, d: jax.ops.segment_sum(x, d, num_docs))(e, seg)
  count = jax.vmap(lambda x, d: jax.ops.segment_sum(x, d, num_docs))(valid.astype(jnp.float32), seg)
  soft = top + tau * jnp.log(jnp.maximum(total, 1e-30) / jnp.maximum(count, 1.0))
  return jnp.where(hard > NEG_INF, jnp.where(tau > 0, soft, hard), hard)


def select_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k documents per row of scores [B, M] (-inf = not selectable).

  Returns (ids [B, k] int32 in descending score, -1 past the k' = min(k, selectable) real ones;
  their scores [B, k], -inf where the id is -1). Ties go to the lower index (`lax.top_k`
  guarantees it), so selection is deterministic.
  """
  b, m = scores.shape
  if m < k:
    scores = jnp.pad(scores, [(0, 0), (0, k - m)], constant_values=NEG_INF)
  values, ids = jax.lax.top_k(scores, k)
  real = values > NEG_INF
  return jnp.where(real, ids, -1).astype(jnp.int32), values


def selected_chunk_mask(chunk_doc: jax.Array, selected: jax.Array) -> jax.Array:
  """[B, C] bool: the chunk belongs to one of the selected documents [B, k] (-1 = none)."""
  hit = (chunk_doc[:, :, None] == selected[:, None, :]) & (selected[:, None, :] > 0)
  return jnp.any(hit, axis=-1)


def route(q: jax.Array, query_mask: jax.Array, keys: jax.Array, chunk_valid: jax.Array,
          chunk_doc: jax.Array, *, num_docs: int, k: int, scale: float, head_reduce: HeadReduce,
          query_reduce: QueryReduce, chunk_reduce: ChunkReduce,
          softness=0.0) -> tuple[jax.Array, jax.Array]:
  """Chunk scores -> document scores [B, num_docs] -> selected document ids [B, k] (-1 padded).

  softness > 0 (training only) smooths the MAX reductions over routing tokens and chunks into
  log-mean-exps (`smooth_max`).
  """
  cs = chunk_scores(q, query_mask, keys, chunk_valid, scale=scale, head_reduce=head_reduce,
                    query_reduce=query_reduce, softness=softness)
  ds = doc_scores(cs, chunk_doc, num_docs, chunk_reduce, softness)
  selected, _ = select_top_k(ds, k)
  return ds, selected
