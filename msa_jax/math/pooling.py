"""Chunk-mean pooling of documents (SPEC §5).

Chunk j of a document covers its tokens [jP, (j+1)P); a partial last chunk is the mean of its
actual tokens (never zero-padded). Sums are accumulated per chunk in float32 (no prefix-sum
differences, which lose precision on long inputs).

Two layouts share these semantics:
- `chunk_mean`: documents padded to a rectangle, x [M, L, ...] with lengths [M] (encoding).
- `PackedChunks` + `segment_chunk_mean`: documents packed along a sequence with other tokens,
  x [B, T, ...] with per-token document ids (the training path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from msa_jax.math import roles


def num_chunks(length: int, pooling_size: int) -> int:
  """⌈length / P⌉: the number of chunks a document of `length` tokens has."""
  return -(-length // pooling_size)


def chunk_mean(x: jax.Array, lengths: jax.Array, pooling_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-document chunk means of padded documents.

  Args:
    x: [M, L, ...] document tokens, padded past each document's length (padding is ignored).
    lengths: [M] int, tokens per document (0 allowed: no chunks).
    pooling_size: P.

  Returns:
    means [M, C, ...] in float32 with C = ⌈L/P⌉ (zeros for chunks past a document's end), and
    counts [M, C] int32, the number of tokens in each chunk (0 marks an invalid chunk).
  """
  m, length = x.shape[:2]
  c = num_chunks(length, pooling_size)
  pad = c * pooling_size - length
  valid = jnp.arange(length)[None, :] < lengths[:, None]  # M L
  xf = jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x.astype(jnp.float32), 0.0)
  xf = jnp.pad(xf, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  sums = xf.reshape((m, c, pooling_size) + x.shape[2:]).sum(axis=2)  # M C ...
  counts = jnp.pad(valid, [(0, 0), (0, pad)]).reshape(m, c, pooling_size).sum(-1, dtype=jnp.int32)
  denom = jnp.maximum(counts, 1).astype(jnp.float32).reshape(counts.shape + (1,) * (x.ndim - 2))
  return sums / denom, counts


@struct.dataclass
class PackedChunks:
  """Where the chunks of documents packed in a sequence are (all arrays; C is a static bound).

  token_chunk: [B, T] int32, index of the token's chunk, or -1 for tokens outside documents.
  chunk_doc: [B, C] int32, document id of each chunk slot (0 = unused slot).
  chunk_start: [B, C] int32, sequence index of each chunk's first token (T for unused slots).
  chunk_count: [B, C] int32, tokens in each chunk (0 = unused slot).
  """

  token_chunk: jax.Array
  chunk_doc: jax.Array
  chunk_start: jax.Array
  chunk_count: jax.Array

  @property
  def chunk_valid(self) -> jax.Array:
    return self.chunk_count > 0

  @classmethod
  def from_doc_ids(cls, doc_ids: jax.Array, valid: jax.Array, pooling_size: int,
                   max_chunks: int) -> "PackedChunks":
    """Chunks of the documents in doc_ids [B, T] (valid [B, T] bool masks padding).

    Documents must be contiguous runs of one id (checked on the host by the batch validation).
    Chunks are numbered in sequence order; `max_chunks` must be >= the real count of every row
    (extra chunks are dropped silently otherwise, so callers size it with `count_chunks`).
    """
    b, t = doc_ids.shape
    is_doc = valid & (doc_ids >= roles.FIRST_DOC)
    idx = jnp.arange(t, dtype=jnp.int32)
    prev_doc = jnp.pad(jnp.where(is_doc, doc_ids, 0), [(0, 0), (1, 0)])[:, :-1]
    starts_doc = is_doc & (doc_ids != prev_doc)
    doc_start = jax.lax.cummax(jnp.where(starts_doc, idx, 0), axis=1)
    offset = idx - doc_start  # token index within its document
    starts_chunk = is_doc & (offset % pooling_size == 0)
    token_chunk = jnp.where(is_doc, jnp.cumsum(starts_chunk, axis=1, dtype=jnp.int32) - 1, -1)
    seg = jnp.where(is_doc, token_chunk, max_chunks)  # out-of-range segment ids are dropped

    def per_row(seg_row, doc_row, is_doc_row):
      count = jax.ops.segment_sum(is_doc_row.astype(jnp.int32), seg_row, max_chunks)
      doc = jax.ops.segment_max(jnp.where(is_doc_row, doc_row, 0), seg_row, max_chunks)
      start = jax.ops.segment_min(idx, seg_row, max_chunks)
      return count, jnp.maximum(doc, 0), jnp.minimum(start, t)

    count, doc, start = jax.vmap(per_row)(seg, doc_ids.astype(jnp.int32), is_doc)
    return cls(token_chunk=token_chunk, chunk_doc=doc, chunk_start=start, chunk_count=count)


def segment_chunk_mean(x: jax.Array, chunks: PackedChunks) -> jax.Array:
  """Chunk means of packed documents: x [B, T, ...] -> [B, C, ...] in float32 (0 for unused slots)."""
  max_chunks = chunks.chunk_count.shape[1]
  seg = jnp.where(chunks.token_chunk >= 0, chunks.token_chunk, max_chunks)
  sums = jax.vmap(lambda xr, sr: jax.ops.segment_sum(xr.astype(jnp.float32), sr, max_chunks))(x, seg)
  denom = jnp.maximum(chunks.chunk_count, 1).astype(jnp.float32)
  return sums / denom.reshape(denom.shape + (1,) * (x.ndim - 2))
