"""Routing (SPEC §6) against float64 NumPy references.

s[t, h, c] = scale · <q[t, h], K̄[c, ⌊h/G⌋]>; reduce over heads (mean | max), then over routing
tokens (max | mean | last; a sample with none gives -inf), then chunk → document (max | mean) into
scores indexed by document id (id 0 and absent documents -inf); select the top k' = min(k, present)
documents in descending score, ties toward the lower id, -1 / -inf past k'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce
from msa_jax.math import routing

ATOL = 1e-5  # raw dot products of O(1) vectors, float32 vs float64
RTOL = 1e-5
SCORE_ATOL = 1e-6  # cosine document scores

token_chunk_scores = jax.jit(routing.token_chunk_scores)
reduce_heads = jax.jit(routing.reduce_heads, static_argnames="how")
reduce_queries = jax.jit(routing.reduce_queries, static_argnames="how")
chunk_scores = jax.jit(routing.chunk_scores, static_argnames=("head_reduce", "query_reduce"))
doc_scores = jax.jit(routing.doc_scores, static_argnames=("num_docs", "how"))
select_top_k = jax.jit(routing.select_top_k, static_argnames="k")
selected_chunk_mask = jax.jit(routing.selected_chunk_mask)
route = jax.jit(routing.route, static_argnames=("num_docs", "k", "head_reduce", "query_reduce",
                                                "chunk_reduce"))


# --- references --------------------------------------------------------------------------------

def ref_token_chunk_scores(q, keys, scale):
  b, t, n, _ = q.shape
  c, kh = keys.shape[1], keys.shape[2]
  g = n // kh
  s = np.zeros((b, t, n, c))
  for i, j, h, cc in np.ndindex(b, t, n, c):
    s[i, j, h, cc] = scale * np.dot(q[i, j, h].astype(np.float64), keys[i, cc, h // g].astype(np.float64))
  return s


def ref_reduce_heads(s, how):
  return s.mean(axis=2) if how is HeadReduce.MEAN else s.max(axis=2)


def ref_reduce_queries(s, query_mask, how):
  b, _, c = s.shape
  out = np.full((b, c), -np.inf)
  for i in range(b):
    idx = np.flatnonzero(query_mask[i])
    if idx.size == 0:
      continue
    rows = s[i, idx]
    out[i] = {QueryReduce.MAX: lambda: rows.max(0), QueryReduce.MEAN: lambda: rows.mean(0),
              QueryReduce.LAST: lambda: rows[-1]}[how]()
  return out


def ref_doc_scores(cs, chunk_doc, num_docs, how):
  out = np.full((cs.shape[0], num_docs), -np.inf)
  for i in range(cs.shape[0]):
    for d in range(1, num_docs):
      mine = cs[i][chunk_doc[i] == d]
      if mine.size:
        out[i, d] = mine.max() if how is ChunkReduce.MAX else mine.mean()
  return out


def ref_select_top_k(scores, k):
  b, m = scores.shape
  ids, vals = -np.ones((b, k), np.int64), np.full((b, k), -np.inf)
  for i in range(b):
    order = sorted((d for d in range(m) if scores[i, d] > -np.inf), key=lambda d: (-scores[i, d], d))
    for j, d in enumerate(order[:k]):
      ids[i, j], vals[i, j] = d, scores[i, d]
  return ids, vals


def ref_selected_chunk_mask(chunk_doc, selected):
  return np.array([[d > 0 and d in set(sel[sel > 0].tolist()) for d in row]
                   for row, sel in zip(chunk_doc, selected)])


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_scores_equal(got, want, atol):
  """Same -inf pattern, finite values close."""
  got = np.asarray(got)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=RTOL)


# --- per-head scores and reductions ------------------------------------------------------------

@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (3, 1)], ids=["G1", "G3", "MQA"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_token_chunk_scores_use_kv_head_h_over_g(num_heads, num_kv_heads, scale):
  rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
  q = rng.standard_normal((2, 5, num_heads, 6)).astype(np.float32)
  keys = rng.standard_normal((2, 7, num_kv_heads, 6)).astype(np.float32)
  got = token_chunk_scores(jnp.asarray(q), jnp.asarray(keys), scale)
  assert got.shape == (2, 5, num_heads, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref_token_chunk_scores(q, keys, scale), atol=ATOL,
                             rtol=RTOL)


@pytest.mark.parametrize("how", list(HeadReduce))
def test_reduce_heads(how):
  rng = np.random.default_rng(0)
  s = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(reduce_heads(jnp.asarray(s), how=how)), ref_reduce_heads(s, how),
                             atol=ATOL, rtol=RTOL)


# Routing tokens per row: several scattered, a single one, none at all, the last one first-of-many.
QUERY_MASK = np.array([
    [0, 1, 1, 0, 0, 1, 0],
    [0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
    [1, 0, 1, 0, 0, 0, 1],
], bool)


@pytest.mark.parametrize("how", list(QueryReduce))
def test_reduce_queries_over_routing_tokens_only(how):
  rng = np.random.default_rng(1)
  s = rng.standard_normal((4, 7, 5)).astype(np.float32)
  s[~QUERY_MASK] = 50.0  # non-routing tokens are loud: they must not count
  got = np.asarray(reduce_queries(jnp.asarray(s), jnp.asarray(QUERY_MASK), how=how))
  want = ref_reduce_queries(s, QUERY_MASK, how)
  assert np.all(np.isneginf(got[2])), "a row without routing tokens scores -inf"
  assert_scores_equal(got, want, ATOL)


def test_reduce_queries_last_is_the_highest_sequence_index():
  s = np.repeat(np.arange(4 * 7, dtype=np.float32).reshape(4, 7, 1), 5, axis=2)
  got = np.asarray(reduce_queries(jnp.asarray(s), jnp.asarray(QUERY_MASK), how=QueryReduce.LAST))
  np.testing.assert_array_equal(got[:, 0], [5, 7 + 3, -np.inf, 21 + 6])


@pytest.mark.parametrize("head_reduce,query_reduce", [(HeadReduce.MAX, QueryReduce.LAST),
                                                      (HeadReduce.MEAN, QueryReduce.MEAN)])
def test_chunk_scores_mask_invalid_chunks_and_rows_without_queries(head_reduce, query_reduce):
  rng = np.random.default_rng(2)
  q = unit(rng.standard_normal((4, 7, 6, 8))).astype(np.float32)
  keys = unit(rng.standard_normal((4, 5, 2, 8))).astype(np.float32)
  chunk_valid = rng.random((4, 5)) < 0.7
  chunk_valid[:, 0] = True
  got = chunk_scores(jnp.asarray(q), jnp.asarray(QUERY_MASK), jnp.asarray(keys), jnp.asarray(chunk_valid),
                     scale=1.0, head_reduce=head_reduce, query_reduce=query_reduce)
  s = ref_reduce_queries(ref_reduce_heads(ref_token_chunk_scores(q, keys, 1.0), head_reduce),
                         QUERY_MASK, query_reduce)
  want = np.where(chunk_valid, s, -np.inf)
  assert_scores_equal(got, want, SCORE_ATOL)


# --- chunk → document --------------------------------------------------------------------------

NUM_DOCS = 6  # ids 0..5
CHUNK_DOC = np.array([
    [1, 1, 2, 3, 3, 3, 0, 0],  # docs 4, 5 absent
    [2, 2, 5, 0, 0, 0, 0, 0],  # doc 1 absent
    [1, 2, 3, 4, 5, 5, 5, 0],  # all present; row without routing tokens below
    [0, 0, 0, 0, 0, 0, 0, 0],  # no documents
])


def chunk_score_fixture(seed=3):
  rng = np.random.default_rng(seed)
  cs = rng.uniform(-1, 1, CHUNK_DOC.shape).astype(np.float32)
  cs[CHUNK_DOC == 0] = -np.inf  # unused slots (what chunk_scores produces)
  cs[2] = -np.inf  # no routing token: every chunk is -inf
  return cs


@pytest.mark.parametrize("how", list(ChunkReduce))
def test_doc_scores_reduce_chunks_per_document(how):
  cs = chunk_score_fixture()
  got = np.asarray(doc_scores(jnp.asarray(cs), jnp.asarray(CHUNK_DOC), num_docs=NUM_DOCS, how=how))
  assert got.shape == (4, NUM_DOCS)
  assert np.all(np.isneginf(got[:, 0])), "document id 0 is never a document"
  assert np.isneginf(got[0, 4]) and np.isneginf(got[0, 5]) and np.isneginf(got[1, 1])
  assert np.all(np.isneginf(got[2])) and np.all(np.isneginf(got[3]))
  assert_scores_equal(got, ref_doc_scores(cs.astype(np.float64), CHUNK_DOC, NUM_DOCS, how), SCORE_ATOL)


def test_doc_scores_max_and_mean_differ_on_multi_chunk_documents():
  cs = np.full(CHUNK_DOC.shape, -np.inf, np.float32)
  cs[0, :6] = [0.9, -0.5, 0.1, 0.2, 0.4, 0.0]  # docs 1 1 2 3 3 3
  mx = np.asarray(doc_scores(jnp.asarray(cs), jnp.asarray(CHUNK_DOC), num_docs=NUM_DOCS,
                             how=ChunkReduce.MAX))
  mn = np.asarray(doc_scores(jnp.asarray(cs), jnp.asarray(CHUNK_DOC), num_docs=NUM_DOCS,
                             how=ChunkReduce.MEAN))
  np.testing.assert_allclose(mx[0, 1:4], [0.9, 0.1, 0.4], atol=SCORE_ATOL)
  np.testing.assert_allclose(mn[0, 1:4], [0.2, 0.1, 0.2], atol=SCORE_ATOL)


# --- top-k selection ---------------------------------------------------------------------------

NINF = -np.inf


# Named rows of document scores over ids 0..5 (-inf = not selectable), all selected with one call.
TOP_K_ROWS = {
    "distinct": [NINF, 0.3, -0.2, 0.9, 0.1, 0.6],
    "two_present": [NINF, NINF, 0.4, NINF, -0.7, NINF],
    "one_doc": [NINF, NINF, NINF, NINF, 0.5, NINF],
    "none": [NINF] * 6,
    "ties": [NINF, 0.5, 0.7, 0.5, 0.7, 0.5],  # lower id first, also across the k boundary
    "all_tied": [NINF, -1.0, -1.0, -1.0, -1.0, -1.0],
    "negative": [NINF, -0.9, -0.1, -0.5, -0.3, -0.2],
}


@pytest.mark.parametrize("k", [1, 3, 5, 8], ids=lambda k: f"k{k}")  # 8 > number of ids
def test_select_top_k(k):
  scores = np.array(list(TOP_K_ROWS.values()), np.float32)
  ids, vals = select_top_k(jnp.asarray(scores), k=k)
  want_ids, want_vals = ref_select_top_k(scores, k)
  assert ids.shape == (scores.shape[0], k) and ids.dtype == jnp.int32
  for row, name in enumerate(TOP_K_ROWS):
    np.testing.assert_array_equal(np.asarray(ids)[row], want_ids[row], err_msg=name)
    np.testing.assert_array_equal(np.asarray(vals)[row], want_vals[row], err_msg=name)


def test_select_top_k_by_hand():
  scores = np.array(list(TOP_K_ROWS.values()), np.float32)
  ids = np.asarray(select_top_k(jnp.asarray(scores), k=3)[0])
  rows = dict(zip(TOP_K_ROWS, ids.tolist()))
  assert rows["distinct"] == [3, 5, 1]
  assert rows["two_present"] == [2, 4, -1]
  assert rows["one_doc"] == [4, -1, -1]
  assert rows["none"] == [-1, -1, -1]
  assert rows["ties"] == [2, 4, 1]  # 1 beats the tied 3 and 5
  assert rows["all_tied"] == [1, 2, 3]
  ids8 = np.asarray(select_top_k(jnp.asarray(scores), k=8)[0])
  assert ids8[0].tolist() == [3, 5, 1, 4, 2, -1, -1, -1]


def test_selected_chunk_mask():
  selected = np.array([[3, 1, -1], [5, -1, -1], [-1, -1, -1], [2, 4, 1]])
  got = selected_chunk_mask(jnp.asarray(CHUNK_DOC), jnp.asarray(selected))
  np.testing.assert_array_equal(np.asarray(got), ref_selected_chunk_mask(CHUNK_DOC, selected))
  assert not np.asarray(got)[3].any(), "unused slots (doc 0) are never selected"


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_heads,num_kv_heads,head_reduce,query_reduce,chunk_reduce", [
    (2, 2, HeadReduce.MEAN, QueryReduce.MAX, ChunkReduce.MAX),  # the paper's setting
    (6, 2, HeadReduce.MAX, QueryReduce.MEAN, ChunkReduce.MEAN),
    (6, 2, HeadReduce.MEAN, QueryReduce.LAST, ChunkReduce.MAX),
], ids=["G1_paper", "G3_max_mean_mean", "G3_mean_last_max"])
def test_route_end_to_end(num_heads, num_kv_heads, head_reduce, query_reduce, chunk_reduce):
  rng = np.random.default_rng(num_heads)
  q = unit(rng.standard_normal((4, 7, num_heads, 8))).astype(np.float32)
  keys = unit(rng.standard_normal((4, 8, num_kv_heads, 8))).astype(np.float32)
  chunk_valid = CHUNK_DOC > 0
  ds, sel = route(jnp.asarray(q), jnp.asarray(QUERY_MASK), jnp.asarray(keys), jnp.asarray(chunk_valid),
                  jnp.asarray(CHUNK_DOC), num_docs=NUM_DOCS, k=3, scale=1.0, head_reduce=head_reduce,
                  query_reduce=query_reduce, chunk_reduce=chunk_reduce)
  s = ref_reduce_queries(ref_reduce_heads(ref_token_chunk_scores(q, keys, 1.0), head_reduce),
                         QUERY_MASK, query_reduce)
  want_ds = ref_doc_scores(np.where(chunk_valid, s, -np.inf), CHUNK_DOC, NUM_DOCS, chunk_reduce)
  assert_scores_equal(ds, want_ds, SCORE_ATOL)
  want_sel, _ = ref_select_top_k(want_ds, 3)
  np.testing.assert_array_equal(np.asarray(sel), want_sel)
  np.testing.assert_array_equal(np.asarray(sel)[2:], -1)  # no routing token / no documents


def test_route_breaks_exact_ties_toward_the_lower_document_id():
  """Documents 2 and 4 have bit-identical chunk keys, hence identical scores: 2 wins."""
  rng = np.random.default_rng(9)
  q = unit(rng.standard_normal((1, 3, 2, 8))).astype(np.float32)
  keys = unit(rng.standard_normal((1, 5, 2, 8))).astype(np.float32)
  chunk_doc = np.array([[1, 2, 3, 4, 5]])
  keys[0, 3] = keys[0, 1]  # doc 4 copies doc 2
  qm = np.array([[1, 1, 0]], bool)
  # make docs 2 and 4 the best by aligning the first routing token with their key
  q[0, 0] = keys[0, 1]
  ds, sel = route(jnp.asarray(q), jnp.asarray(qm), jnp.asarray(keys), jnp.ones((1, 5), bool),
                  jnp.asarray(chunk_doc), num_docs=6, k=1, scale=1.0, head_reduce=HeadReduce.MEAN,
                  query_reduce=QueryReduce.MAX, chunk_reduce=ChunkReduce.MAX)
  ds = np.asarray(ds)
  assert ds[0, 2] == ds[0, 4] and ds[0, 2] == ds[0, 1:].max()
  np.testing.assert_array_equal(np.asarray(sel), [[2]])


# --- the smooth max of training (`route_softness`) ---------------------------------------------

def ref_log_mean_exp(x, tau):
  x = np.asarray(x, np.float64)
  return tau * np.log(np.mean(np.exp(x / tau)))


@pytest.mark.parametrize("tau", [0.05, 0.3, 2.0])
def test_smooth_max_over_routing_tokens_is_the_log_mean_exp(tau):
  rng = np.random.default_rng(11)
  s = rng.uniform(-1, 1, (4, 7, 5)).astype(np.float32)
  s[~QUERY_MASK] = 50.0  # non-routing tokens must not count
  got = np.asarray(reduce_queries(jnp.asarray(s), jnp.asarray(QUERY_MASK), how=QueryReduce.MAX,
                                  softness=jnp.float32(tau)))
  want = np.full((4, 5), -np.inf)
  for i in range(4):
    idx = np.flatnonzero(QUERY_MASK[i])
    if idx.size:
      want[i] = [ref_log_mean_exp(s[i, idx, c], tau) for c in range(5)]
  assert_scores_equal(got, want, ATOL)
  # A single routing token: the smooth max is that token's score.
  np.testing.assert_allclose(got[1], s[1, 3], atol=ATOL)
  # Between the mean and the max.
  hard = ref_reduce_queries(s, QUERY_MASK, QueryReduce.MAX)
  mean = ref_reduce_queries(s, QUERY_MASK, QueryReduce.MEAN)
  fin = np.isfinite(hard)
  assert np.all(got[fin] <= hard[fin] + 1e-6) and np.all(got[fin] >= mean[fin] - 1e-6)


def test_smooth_max_with_softness_zero_is_the_exact_max_traced_or_not():
  rng = np.random.default_rng(12)
  s = jnp.asarray(rng.standard_normal((4, 7, 5)).astype(np.float32))
  exact = np.asarray(reduce_queries(s, jnp.asarray(QUERY_MASK), how=QueryReduce.MAX))
  traced = np.asarray(reduce_queries(s, jnp.asarray(QUERY_MASK), how=QueryReduce.MAX,
                                     softness=jnp.float32(0.0)))
  np.testing.assert_array_equal(traced, exact)
  tiny = np.asarray(reduce_queries(s, jnp.asarray(QUERY_MASK), how=QueryReduce.MAX, softness=1e-4))
  assert_scores_equal(tiny, exact, 1e-3)  # τ·log(count) at most 1e-4·log 3


def test_smooth_max_sends_gradient_to_every_routing_token_and_none_elsewhere():
  rng = np.random.default_rng(13)
  s = jnp.asarray(rng.standard_normal((4, 7, 5)).astype(np.float32))
  mask = jnp.asarray(QUERY_MASK)

  def grad(softness):
    f = lambda s: jnp.sum(jnp.where(jnp.isfinite(o := reduce_queries(s, mask, how=QueryReduce.MAX,
                                                                      softness=softness)), o, 0.0))
    return np.asarray(jax.grad(f)(s))

  exact, smooth = grad(jnp.float32(0.0)), grad(jnp.float32(0.3))
  assert np.all(np.isfinite(exact)) and np.all(np.isfinite(smooth))  # the row without tokens too
  per_chunk = (exact != 0).sum(axis=1)  # B C: the max's gradient reaches one token
  np.testing.assert_array_equal(per_chunk, np.broadcast_to(QUERY_MASK.any(1)[:, None], (4, 5)))
  np.testing.assert_array_equal(smooth != 0, np.broadcast_to(QUERY_MASK[:, :, None], s.shape))
  # The weights of a log-mean-exp sum to one per (row, chunk).
  np.testing.assert_allclose(smooth.sum(axis=1), QUERY_MASK.any(1)[:, None] * np.ones((4, 5)),
                             atol=1e-5)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_smooth_max_over_chunks_counts_only_finite_chunks(tau):
  cs = chunk_score_fixture()
  cs[0, 2] = -np.inf  # a chunk past its document's end (chunk_valid false): doc 2 has none left
  cs[1, 1] = -np.inf  # doc 2 of row 1 keeps one finite chunk
  got = np.asarray(doc_scores(jnp.asarray(cs), jnp.asarray(CHUNK_DOC), num_docs=NUM_DOCS,
                              how=ChunkReduce.MAX, softness=jnp.float32(tau)))
  want = np.full((4, NUM_DOCS), -np.inf)
  for i in range(4):
    for d in range(1, NUM_DOCS):
      mine = cs[i][(CHUNK_DOC[i] == d) & np.isfinite(cs[i])]
      if mine.size:
        want[i, d] = ref_log_mean_exp(mine, tau)
  assert_scores_equal(got, want, ATOL)
  assert np.isneginf(got[0, 2]) and got[1, 2] == pytest.approx(cs[1, 0], abs=ATOL)


def test_smooth_max_over_chunks_has_no_length_bias():
  """A document made of two copies of another's chunks scores the same (a log-*sum*-exp would not)."""
  chunk_doc = np.array([[1, 1, 2, 2, 2, 2]])
  cs = np.array([[0.3, -0.2, 0.3, -0.2, 0.3, -0.2]], np.float32)
  got = np.asarray(doc_scores(jnp.asarray(cs), jnp.asarray(chunk_doc), num_docs=3,
                              how=ChunkReduce.MAX, softness=jnp.float32(0.2)))
  assert got[0, 1] == pytest.approx(got[0, 2], abs=1e-6)
  assert got[0, 1] == pytest.approx(ref_log_mean_exp([0.3, -0.2], 0.2), abs=ATOL)


def test_route_with_softness_zero_matches_the_exact_route():
  rng = np.random.default_rng(14)
  q = unit(rng.standard_normal((4, 7, 4, 8))).astype(np.float32)
  keys = unit(rng.standard_normal((4, 8, 2, 8))).astype(np.float32)
  args = (jnp.asarray(q), jnp.asarray(QUERY_MASK), jnp.asarray(keys), jnp.asarray(CHUNK_DOC > 0),
          jnp.asarray(CHUNK_DOC))
  kw = dict(num_docs=NUM_DOCS, k=3, scale=1.0, head_reduce=HeadReduce.MEAN,
            query_reduce=QueryReduce.MAX, chunk_reduce=ChunkReduce.MAX)
  exact = route(*args, **kw)
  traced = route(*args, **kw, softness=jnp.float32(0.0))
  for a, b in zip(exact, traced):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  soft_scores, _ = route(*args, **kw, softness=jnp.float32(0.2))
  fin = np.isfinite(np.asarray(exact[0]))
  assert np.all(np.asarray(soft_scores)[fin] < np.asarray(exact[0])[fin] + 1e-6)
