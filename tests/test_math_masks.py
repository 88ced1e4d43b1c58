"""Training-path attention masks (SPEC §4) against a per-pair NumPy reference.

Query i may attend key j iff both are real tokens, j ≤ i, and either both are tokens of the same
document, or both are active (roles 0, -1, -2). Memory: an active token i sees a chunk c of a
selected document iff the chunk's first token comes before it (chunk_start[c] < i).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.math import masks

token_mask = jax.jit(masks.token_mask)
memory_mask = jax.jit(masks.memory_mask)


def ref_token_mask(doc_ids, valid):
  b, t = doc_ids.shape
  out = np.zeros((b, t, t), bool)
  for r, i, j in np.ndindex(b, t, t):
    if not (valid[r, i] and valid[r, j] and j <= i):
      continue
    di, dj = doc_ids[r, i], doc_ids[r, j]
    out[r, i, j] = (di == dj) if di >= 1 else (dj < 1)
  return out


def ref_memory_mask(doc_ids, valid, chunk_start, chunk_selected):
  b, t = doc_ids.shape
  c = chunk_start.shape[1]
  out = np.zeros((b, t, c), bool)
  for r, i, cc in np.ndindex(b, t, c):
    out[r, i, cc] = valid[r, i] and doc_ids[r, i] < 1 and chunk_selected[r, cc] and chunk_start[r, cc] < i
  return out


# 'x' = padding (its doc id is junk and must not matter).
ROWS = [
    "-2 -2 1 1 1 2 3 3 3 3 3 0 0 -1 -1 0 -1 x x x",  # template, docs, query/answer interleaved, right pad
    "x x x x -2 1 1 2 2 2 2 2 0 0 0 -1 -1 -1 -1 -1",  # left padding
    "x 1 1 1 1 1 1 1 2 2 0 -1 -1 -1 -1 0 -1 -1 x x",  # both sides, no template
    "-2 -2 -2 0 0 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1",  # no documents
]


def layout(seed=0):
  rng = np.random.default_rng(seed)
  toks = [r.split() for r in ROWS]
  valid = np.array([[tok != "x" for tok in r] for r in toks])
  doc_ids = np.array([[int(tok) if tok != "x" else 0 for tok in r] for r in toks])
  doc_ids = np.where(valid, doc_ids, rng.choice([-2, -1, 0, 1, 2, 3], size=valid.shape))
  return doc_ids.astype(np.int32), valid


def test_token_mask_matches_reference():
  doc_ids, valid = layout()
  got = np.asarray(token_mask(jnp.asarray(doc_ids), jnp.asarray(valid)))
  np.testing.assert_array_equal(got, ref_token_mask(doc_ids, valid))


def test_token_mask_properties_row_by_row():
  """Spelled out on row 0: documents see only their own past; active tokens never see documents."""
  doc_ids, valid = layout()
  m = np.asarray(token_mask(jnp.asarray(doc_ids), jnp.asarray(valid)))[0]
  d = doc_ids[0]
  d = np.where(valid[0], d, -99)  # padding ids are junk
  doc2 = np.flatnonzero(d == 2)[0]
  assert m[doc2].tolist() == [j == doc2 for j in range(len(d))], "a 1-token doc sees only itself"
  doc3 = np.flatnonzero(d == 3)
  assert np.array_equal(m[doc3[-1]], np.isin(np.arange(len(d)), doc3)), "no template, no other doc"
  first_query = np.flatnonzero(d == 0)[0]
  assert np.array_equal(np.flatnonzero(m[first_query]), [0, 1, first_query]), "template + itself"
  assert not m[:, ~valid[0]].any() and not m[~valid[0]].any(), "padding is excluded both ways"
  assert not m[0, 1], "template is causal"


@pytest.mark.parametrize("seed", [0, 1])
def test_memory_mask_matches_reference(seed):
  doc_ids, valid = layout(seed)
  rng = np.random.default_rng(seed + 10)
  b, t = doc_ids.shape
  c = 6
  chunk_start = rng.integers(0, t + 1, (b, c)).astype(np.int32)
  chunk_start[:, -1] = t  # an unused slot
  chunk_selected = rng.random((b, c)) < 0.6
  got = memory_mask(jnp.asarray(doc_ids), jnp.asarray(valid), jnp.asarray(chunk_start),
                    jnp.asarray(chunk_selected))
  np.testing.assert_array_equal(np.asarray(got),
                                ref_memory_mask(doc_ids, valid, chunk_start, chunk_selected))


def test_memory_is_visible_strictly_after_the_chunk_start():
  """A chunk starting at 5 is invisible to active tokens at ≤ 5, visible from 6 on; docs never see it."""
  doc_ids = np.array([[-2, -2, 0, -1, -1, 0, -1, 1, 0, -1]], np.int32)
  valid = np.ones_like(doc_ids, bool)
  valid[0, 9] = False
  got = np.asarray(memory_mask(jnp.asarray(doc_ids), jnp.asarray(valid), jnp.array([[5, 0]]),
                               jnp.array([[True, False]])))[0]
  np.testing.assert_array_equal(got[:, 0], [0, 0, 0, 0, 0, 0, 1, 0, 1, 0])
  assert not got[:, 1].any(), "unselected chunks are invisible"
