"""Chunk-mean pooling (SPEC §5) against float64 NumPy references.

Per document, chunk j covers its tokens [jP, (j+1)P); a partial last chunk is the mean of its real
tokens; a document of length n has ⌈n/P⌉ chunks. Two layouts: documents padded to a rectangle
(`chunk_mean`) and documents packed in a sequence with other roles (`PackedChunks` +
`segment_chunk_mean`, SPEC §2 roles: d ≥ 1 document, 0 query, -1 answer, -2 template; padding is
attention_mask == 0 whatever its doc id says). Packed chunks are numbered in sequence order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.math import pooling

ATOL = 1e-5
RTOL = 1e-5

chunk_mean = jax.jit(pooling.chunk_mean, static_argnames="pooling_size")
from_doc_ids = jax.jit(pooling.PackedChunks.from_doc_ids, static_argnames=("pooling_size", "max_chunks"))
segment_chunk_mean = jax.jit(pooling.segment_chunk_mean)


# --- references --------------------------------------------------------------------------------

def ref_chunk_mean(x, lengths, p):
  """Padded documents [M, L, ...] -> (means [M, ⌈L/P⌉, ...], counts [M, ⌈L/P⌉])."""
  m, length = x.shape[:2]
  c = -(-length // p)
  means = np.zeros((m, c) + x.shape[2:])
  counts = np.zeros((m, c), np.int64)
  for i in range(m):
    for j in range(c):
      toks = [t for t in range(j * p, (j + 1) * p) if t < lengths[i]]
      counts[i, j] = len(toks)
      if toks:
        means[i, j] = np.mean(np.asarray(x[i, toks], np.float64), axis=0)
  return means, counts


def ref_packed_chunks(doc_ids, valid, p):
  """Per row: list of chunks (doc id, [token indices]) in sequence order."""
  rows = []
  for ids, ok in zip(doc_ids, valid):
    chunks, seen = [], {}
    for t, (d, v) in enumerate(zip(ids, ok)):
      if not v or d < 1:
        continue
      offset = seen.get(d, 0)  # documents are contiguous: offset = tokens of d so far
      seen[d] = offset + 1
      if offset % p == 0:
        chunks.append((int(d), []))
      chunks[-1][1].append(t)
    rows.append(chunks)
  return rows


def ref_packed_arrays(doc_ids, valid, p, max_chunks):
  """The PackedChunks fields from the reference chunk lists (unused slots: doc 0, start T, count 0)."""
  b, t = doc_ids.shape
  token_chunk = -np.ones((b, t), np.int64)
  chunk_doc = np.zeros((b, max_chunks), np.int64)
  chunk_start = np.full((b, max_chunks), t, np.int64)
  chunk_count = np.zeros((b, max_chunks), np.int64)
  for r, chunks in enumerate(ref_packed_chunks(doc_ids, valid, p)):
    assert len(chunks) <= max_chunks
    for c, (d, toks) in enumerate(chunks):
      token_chunk[r, toks] = c
      chunk_doc[r, c], chunk_start[r, c], chunk_count[r, c] = d, toks[0], len(toks)
  return token_chunk, chunk_doc, chunk_start, chunk_count


def ref_segment_chunk_mean(x, doc_ids, valid, p, max_chunks):
  out = np.zeros((x.shape[0], max_chunks) + x.shape[2:])
  for r, chunks in enumerate(ref_packed_chunks(doc_ids, valid, p)):
    for c, (_, toks) in enumerate(chunks):
      out[r, c] = np.mean(np.asarray(x[r, toks], np.float64), axis=0)
  return out


# --- padded documents --------------------------------------------------------------------------

P = 4


@pytest.mark.parametrize("lengths,max_len,trailing", [
    ([1, P - 1, P, P + 1, 0, 2 * P, 2 * P + 1], 2 * P + 1, (2, 3)),  # every boundary case, C = 3
    ([1, P - 1, P, P + 1, 0, 2 * P, 2 * P + 1], 2 * P + 1, ()),
    ([P + 1], P + 1, (5,)),  # one document
    ([0, 0], 3, (5,)),  # no chunks at all
    ([3, 1, 2], 3, ()),  # L < P: one partial chunk each
], ids=["boundaries_KH", "boundaries_scalar", "one_doc", "no_chunks", "shorter_than_P"])
def test_chunk_mean_of_padded_documents(lengths, max_len, trailing):
  rng = np.random.default_rng(len(lengths) * 10 + len(trailing))
  x = rng.standard_normal((len(lengths), max_len) + trailing).astype(np.float32)
  x += 100.0 * (np.arange(max_len) >= np.array(lengths)[:, None]).reshape(
      (len(lengths), max_len) + (1,) * len(trailing))  # padding is loud: must be ignored
  lengths = np.array(lengths, np.int32)
  means, counts = chunk_mean(jnp.asarray(x), jnp.asarray(lengths), pooling_size=P)
  want_means, want_counts = ref_chunk_mean(x, lengths, P)
  assert means.dtype == jnp.float32 and means.shape == want_means.shape
  np.testing.assert_array_equal(np.asarray(counts), want_counts)
  np.testing.assert_allclose(np.asarray(means), want_means, atol=ATOL, rtol=RTOL)
  assert np.all(np.asarray(means)[want_counts == 0] == 0.0)  # chunks past the end are zeros


def test_chunk_counts_are_ceil_length_over_p():
  lengths = np.arange(0, 13)
  _, counts = chunk_mean(jnp.zeros((13, 12)), jnp.asarray(lengths), pooling_size=5)
  np.testing.assert_array_equal(np.sum(np.asarray(counts) > 0, axis=1), -(-lengths // 5))
  assert [pooling.num_chunks(n, 5) for n in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]


def test_pooling_size_one_is_the_identity():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3)).astype(np.float32)
  means, counts = chunk_mean(jnp.asarray(x), jnp.array([5, 2]), pooling_size=1)
  np.testing.assert_array_equal(np.asarray(means)[0], x[0])
  np.testing.assert_array_equal(np.asarray(means)[1, :2], x[1, :2])
  np.testing.assert_array_equal(np.asarray(counts), [[1] * 5, [1, 1, 0, 0, 0]])


# --- packed documents --------------------------------------------------------------------------

# Roles: d >= 1 document (contiguous, ids 1..n in order), 0 query, -1 answer, -2 template;
# 'x' = padding (attention_mask 0, with a junk doc id that must be ignored).
_ROWS = {
    # template, docs of length 1, P-1, P, P+1, 2P+1, queries and answers interleaved, right padding
    "right_padded": "-2 -2 -2 1 2 2 2 3 3 3 3 4 4 4 4 4 5 5 5 5 5 5 5 5 5 0 0 -1 -1 0 -1 x x x",
    # left padding, no template, one document of length P + 2
    "left_padded": "x x x x x 1 1 1 1 1 1 0 0 0 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1",
    # no documents at all
    "no_docs": "-2 -2 0 0 0 " + "-1 " * 25 + "x x x x",
    # padding on both sides, adjacent documents of length P, 1, 1, P - 1
    "both_padded": "x x -2 1 1 1 1 2 3 4 4 4 0 -1 0 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 x x x x",
}


def packed_batch(names, seed=0):
  rows = [_ROWS[n].split() for n in names]
  assert len({len(r) for r in rows}) == 1
  rng = np.random.default_rng(seed)
  valid = np.array([[tok != "x" for tok in r] for r in rows])
  junk = rng.choice([0, 1, 2, 7, -1], size=valid.shape)
  doc_ids = np.array([[int(tok) if tok != "x" else 0 for tok in r] for r in rows])
  doc_ids = np.where(valid, doc_ids, junk).astype(np.int32)
  return doc_ids, valid


ALL_ROWS = ["right_padded", "left_padded", "no_docs", "both_padded"]


@pytest.mark.parametrize("names,max_chunks", [
    (ALL_ROWS, 8),  # exactly the largest row's chunk count
    (ALL_ROWS, 10),  # spare slots
    (["left_padded"], 10),  # one row
], ids=["all_rows_exact_fit", "all_rows_spare_slots", "one_row"])
def test_packed_chunks_layout(names, max_chunks):
  doc_ids, valid = packed_batch(names)
  got = from_doc_ids(jnp.asarray(doc_ids), jnp.asarray(valid), pooling_size=P,
                     max_chunks=max_chunks)
  token_chunk, chunk_doc, chunk_start, chunk_count = ref_packed_arrays(doc_ids, valid, P, max_chunks)
  np.testing.assert_array_equal(np.asarray(got.token_chunk), token_chunk)
  np.testing.assert_array_equal(np.asarray(got.chunk_doc), chunk_doc)
  np.testing.assert_array_equal(np.asarray(got.chunk_start), chunk_start)
  np.testing.assert_array_equal(np.asarray(got.chunk_count), chunk_count)
  np.testing.assert_array_equal(np.asarray(got.chunk_valid), chunk_count > 0)


def test_packed_chunks_of_the_spec_example_by_hand():
  """Docs of lengths 1, 3, 4, 5, 9 after a 3-token template (P = 4): chunk table written out."""
  doc_ids, valid = packed_batch(ALL_ROWS)  # row 0 is "right_padded"
  got = from_doc_ids(jnp.asarray(doc_ids), jnp.asarray(valid), pooling_size=P, max_chunks=10)
  t = doc_ids.shape[1]
  np.testing.assert_array_equal(np.asarray(got.chunk_doc)[0], [1, 2, 3, 4, 4, 5, 5, 5, 0, 0])
  np.testing.assert_array_equal(np.asarray(got.chunk_count)[0], [1, 3, 4, 4, 1, 4, 4, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(got.chunk_start)[0], [3, 4, 7, 11, 15, 16, 20, 24, t, t])


@pytest.mark.parametrize("trailing", [(3,), (2, 5)])
def test_segment_chunk_mean_of_packed_rows(trailing):
  doc_ids, valid = packed_batch(ALL_ROWS, seed=1)
  rng = np.random.default_rng(2)
  x = rng.standard_normal(doc_ids.shape + trailing).astype(np.float32)
  x[~valid] = 1e3  # padding values must not leak into any chunk
  chunks = from_doc_ids(jnp.asarray(doc_ids), jnp.asarray(valid), pooling_size=P, max_chunks=10)
  got = segment_chunk_mean(jnp.asarray(x), chunks)
  assert got.dtype == jnp.float32 and got.shape == (len(ALL_ROWS), 10) + trailing
  np.testing.assert_allclose(np.asarray(got), ref_segment_chunk_mean(x, doc_ids, valid, P, 10),
                             atol=ATOL, rtol=RTOL)


def test_packed_and_padded_layouts_agree():
  """The same documents pooled packed in a sequence or padded to a rectangle give the same means."""
  doc_ids, valid = packed_batch(ALL_ROWS)  # row 0 is "right_padded"
  rng = np.random.default_rng(4)
  x = rng.standard_normal(doc_ids.shape + (3,)).astype(np.float32)
  chunks = from_doc_ids(jnp.asarray(doc_ids), jnp.asarray(valid), pooling_size=P, max_chunks=10)
  packed = np.asarray(segment_chunk_mean(jnp.asarray(x), chunks))[0]
  docs = [np.flatnonzero(valid[0] & (doc_ids[0] == d)) for d in range(1, 6)]
  lengths = np.array([len(d) for d in docs])
  padded = np.zeros((5, lengths.max(), 3), np.float32)
  for i, idx in enumerate(docs):
    padded[i, :len(idx)] = x[0, idx]
  means, counts = chunk_mean(jnp.asarray(padded), jnp.asarray(lengths), pooling_size=P)
  means, counts = np.asarray(means), np.asarray(counts)
  np.testing.assert_allclose(np.concatenate([means[i][counts[i] > 0] for i in range(5)]), packed[:8],
                             atol=ATOL, rtol=RTOL)
