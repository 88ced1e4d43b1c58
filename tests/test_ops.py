"""msa_jax.ops: bank routing and top-k block gather, against msa_jax.math (the model's math).

- bank_chunk_scores ("xla": every scan layout — queries as LHS, keys as LHS, tiled — and
  "pallas" in interpret mode) equals routing.chunk_scores with the bank broadcast over the batch;
- bank_top_k_docs equals doc_scores + select_top_k exactly (ids and scores), including ties, a
  wrong Cmax, invalid ids, empty rows and banks whose size no block divides;
- gather_doc_chunks ("xla" and "pallas") equals the gather written out by hand.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import ops
from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce
from msa_jax.math import routing
from msa_jax.ops import _dispatch
from msa_jax.ops import routing as ops_routing

REDUCTIONS = list(itertools.product(HeadReduce, QueryReduce))
# name: (B, T, N, K, H, C)
SHAPES = {
    "tail_gqa1": (2, 5, 2, 2, 16, 37),
    "gqa3": (3, 4, 6, 2, 32, 64),
    "one_token": (1, 1, 3, 1, 16, 20),  # B·T = 1: the queries-as-LHS (GEMV) layout
    "one_chunk": (1, 3, 2, 1, 8, 1),
}
SCANS = {
    "default": ops.ScanConfig(),
    "q_lhs": ops.ScanConfig(gemv_max_rows=10_000),  # every case through q · keysᵀ
    "k_lhs_tiled": ops.ScanConfig(gemv_max_rows=0, tile_c=16),  # keys · qᵀ in tiles of 16
    "per_sample": ops.ScanConfig(per_sample_min_rows=1),  # one scan per sample when B > 1
}
TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # bf16: q is rounded to bf16 after the group sum
# Many small programs: XLA's backend optimisations would only cost compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(shape, dtype, seed=0):
  b, t, n, k, h, c = shape
  rng = np.random.default_rng(seed)
  q = jnp.asarray(_unit(rng.standard_normal((b, t, n, h))), dtype)
  keys = jnp.asarray(_unit(rng.standard_normal((c, k, h))), dtype)
  qm = rng.random((b, t)) < 0.6
  qm[0, -1] = True
  if b > 1:
    qm[-1] = False  # a sample without routing tokens
  cv = rng.random(c) < 0.8
  cv[0] = True
  return q, jnp.asarray(qm), keys, jnp.asarray(cv)


def math_chunk_scores(q, qm, keys, cv, scale, hr, qr):
  b, c = q.shape[0], keys.shape[0]
  return routing.chunk_scores(q.astype(jnp.float32), qm,
                              jnp.broadcast_to(keys.astype(jnp.float32)[None], (b,) + keys.shape),
                              jnp.broadcast_to(cv[None], (b, c)), scale=scale, head_reduce=hr,
                              query_reduce=qr)


def assert_scores_close(got, want, atol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=atol)


# --- dispatch -----------------------------------------------------------------------------------

def test_default_implementation_off_gpu():
  want = "pallas" if jax.default_backend() == "gpu" else "xla"
  assert ops.default_implementation() == want
  assert _dispatch.resolve(None) == want
  assert _dispatch.resolve("pallas") == "pallas"


def test_unknown_implementation_rejected():
  q, qm, keys, cv = make_inputs(SHAPES["gqa3"], jnp.float32)
  with pytest.raises(ValueError, match="implementation='triton'"):
    ops.bank_chunk_scores(q, qm, keys, cv, scale=1.0, head_reduce=HeadReduce.MEAN,
                          query_reduce=QueryReduce.MAX, implementation="triton")


@pytest.mark.parametrize("kw,msg", [(dict(gemv_max_rows=-1), "self.gemv_max_rows=-1"),
                                    (dict(tile_c=0), "self.tile_c=0"),
                                    (dict(per_sample_min_rows=0), "self.per_sample_min_rows=0")])
def test_scan_config_validates(kw, msg):
  with pytest.raises(ValueError, match=msg):
    ops.ScanConfig(**kw)


# --- bank_chunk_scores --------------------------------------------------------------------------

_XLA = {}


def _xla_cases(dtype_name):
  """float32: every reduction on every shape with the default scan and on two shapes with each
  forced layout, plus a negative scale (it swaps max and min, so folding it into q must be
  exact); bfloat16: the default scan on two shapes."""
  if dtype_name == "float32":
    plan = [(n, "default") for n in SHAPES] + [("gqa3", sc) for sc in ("q_lhs", "k_lhs_tiled",
                                                                       "per_sample")]
  else:
    plan = [("tail_gqa1", "default"), ("one_token", "default")]
  cases = [(n, sc, hr, qr, 0.7) for n, sc in plan for hr, qr in REDUCTIONS]
  if dtype_name == "float32":
    cases += [("tail_gqa1", "default", hr, qr, -0.5) for hr, qr in REDUCTIONS]
  return cases


def _xla_results(dtype_name):
  """{(shape, scan, head, query, scale): (ops, math)} from one jitted call per dtype."""
  if dtype_name not in _XLA:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    inputs = {n: make_inputs(s, dtype) for n, s in SHAPES.items()}
    cases = _xla_cases(dtype_name)

    def run(inputs):
      out = []
      for n, sc, hr, qr, scale in cases:
        got = ops.bank_chunk_scores(*inputs[n], scale=scale, head_reduce=hr, query_reduce=qr,
                                    implementation="xla", scan=SCANS[sc])
        out.append((got, math_chunk_scores(*inputs[n], scale, hr, qr)))
      return out

    res = jax.jit(run, compiler_options=FAST_COMPILE)(inputs)
    _XLA[dtype_name] = dict(zip(cases, jax.device_get(res)))
  return _XLA[dtype_name]


XLA_TESTS = sorted({("float32", n, sc) for n, sc, *_ in _xla_cases("float32")} |
                   {("bfloat16", n, sc) for n, sc, *_ in _xla_cases("bfloat16")})


@pytest.mark.parametrize("dtype,name,scan", XLA_TESTS, ids=["-".join(c) for c in XLA_TESTS])
def test_xla_chunk_scores_match_math(dtype, name, scan):
  """Every reduction (and, for float32, a negative scale) of one shape and scan layout."""
  res = _xla_results(dtype)
  cases = [c for c in res if c[:2] == (name, scan)]
  assert len(cases) >= 6
  for case in cases:
    got, want = res[case]
    assert_scores_close(got, want, TOL[dtype])


def test_query_rows_layouts():
  """The rows the xla path scans: 1 per sample for linear query reductions of head mean."""
  q, qm, keys, _ = make_inputs(SHAPES["gqa3"], jnp.float32)  # B=3, T=4, N=6, K=2, H=32
  rows = lambda hr, qr: ops_routing._query_rows(q, qm, 1.0, 2, hr, qr, jnp.float32)
  shape = lambda hr, qr: jax.eval_shape(lambda: rows(hr, qr)[0]).shape
  assert shape(HeadReduce.MEAN, QueryReduce.MEAN) == (3, 1, 64)
  assert shape(HeadReduce.MEAN, QueryReduce.LAST) == (3, 1, 64)
  assert shape(HeadReduce.MEAN, QueryReduce.MAX) == (3, 4, 64)
  assert shape(HeadReduce.MAX, QueryReduce.LAST) == (3, 6, 64)
  assert shape(HeadReduce.MAX, QueryReduce.MEAN) == (3, 24, 64)
  assert rows(HeadReduce.MAX, QueryReduce.MEAN)[1] == 4  # then the mean over T = 4 tokens
  # block-diagonal: head n's row is zero outside kv head n // 3's 32 columns
  r = np.asarray(jax.jit(lambda: rows(HeadReduce.MAX, QueryReduce.LAST)[0])())
  assert np.all(r[:, :3, 32:] == 0) and np.all(r[:, 3:, :32] == 0)


def test_pallas_path_matches_xla():
  """implementation="pallas" reaches the kernel (interpreted off GPU) and agrees."""

  @jax.jit
  def run(inputs):
    out = []
    for hr, qr in [(HeadReduce.MEAN, QueryReduce.MAX), (HeadReduce.MAX, QueryReduce.LAST)]:
      kw = dict(scale=0.7, head_reduce=hr, query_reduce=qr)
      out.append((ops.bank_chunk_scores(*inputs, implementation="pallas", **kw),
                  ops.bank_chunk_scores(*inputs, implementation="xla", **kw)))
    return out

  for got, want in run(make_inputs(SHAPES["tail_gqa1"], jnp.float32)):
    assert_scores_close(got, want, 1e-5)


# --- bank_top_k_docs ----------------------------------------------------------------------------

def _bank_docs(rng, c, max_chunks, shuffle=False):
  """chunk_doc [C]: contiguous runs of 1..max_chunks chunks, ids from 1; (ids, num_docs)."""
  lengths = []
  while sum(lengths) < c:
    lengths.append(int(rng.integers(1, max_chunks + 1)))
  cd = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:c].astype(np.int32)
  if shuffle:
    cd = rng.permutation(cd)
  return cd, len(lengths) + 1


def _topk_cases():
  rng = np.random.default_rng(7)
  cases = {}
  # (B, C, Cmax, k): C = 4099 is prime (no block divides it: the padded prefilter)
  for name, (b, c, cmax, k) in {"plain": (3, 1000, 5, 4), "prime_c_k16": (2, 4099, 16, 16)}.items():
    cd, m = _bank_docs(rng, c, cmax)
    cs = rng.standard_normal((b, c)).astype(np.float32)
    cs[0, rng.random(c) < 0.1] = -np.inf  # invalid chunks
    if b > 2:
      cs[2] = -np.inf  # a sample without routing tokens
    cases[name] = (cs, cd, m, k, cmax, True)
  cd, m = _bank_docs(rng, 600, 4)
  cs = np.round(rng.standard_normal((2, 600)), 1).astype(np.float32)  # many exact ties
  cases["ties"] = (cs, cd, m, 6, 4, None)
  # a wrong (too small) Cmax where the best chunks crowd into a few long documents: the top
  # k·Cmax+1 = 11 chunks cover fewer than 5 documents, so the shortcut must decline
  cd, m = _bank_docs(rng, 600, 8)
  base = np.zeros(m, np.float32)
  base[np.bincount(cd).argsort()[-3:]] = 5.0  # the three longest documents score highest
  cs = (base[cd] + 0.01 * rng.standard_normal((2, 600))).astype(np.float32)
  cases["wrong_cmax"] = (cs, cd, m, 5, 2, False)
  # documents not contiguous, chunks of no document (id 0) and ids past num_docs
  cd, m = _bank_docs(rng, 800, 6, shuffle=True)
  cd[rng.random(800) < 0.2] = 0
  cd[:10] = m + 3
  cases["shuffled_invalid_ids"] = (rng.standard_normal((2, 800)).astype(np.float32), cd, m, 5, 6,
                                   True)
  cd, m = _bank_docs(rng, 40, 4)
  cases["k_ge_docs"] = (rng.standard_normal((2, 40)).astype(np.float32), cd, m, 32, 4, True)
  return cases


TOPK_CASES = _topk_cases()
_TOPK = {}


def _topk_results(reduce):
  """{case: (bank_top_k_docs, doc_scores + select_top_k, shortcut or None)}, one jit per reduce."""
  if reduce not in _TOPK:
    arrays = {n: (jnp.asarray(TOPK_CASES[n][0]), jnp.asarray(TOPK_CASES[n][1]))
              for n, r in TOPK_TESTS if r is reduce}
    run = jax.jit(lambda a: {n: _one_topk(*a[n], *TOPK_CASES[n][2:5], reduce) for n in a},
                  compiler_options=FAST_COMPILE)
    _TOPK[reduce] = jax.device_get(run(arrays))
  return _TOPK[reduce]


def _one_topk(cs, cd, m, k, cmax, reduce):
  fast = ops.bank_top_k_docs(cs, cd, m, k, cmax, reduce)
  want = routing.select_top_k(routing.doc_scores(
      cs, jnp.broadcast_to(cd[None], cs.shape), m, reduce), k)
  l = k * cmax + 1
  short = (ops_routing._shortcut_top_k_docs(cs, cd, m, k, l)
           if l < cs.shape[1] and reduce is ChunkReduce.MAX else None)
  return fast, want, short


# chunk reduce mean is segment sums (the same code as doc_scores): two cases suffice
TOPK_TESTS = [(n, ChunkReduce.MAX) for n in TOPK_CASES] + [
    (n, ChunkReduce.MEAN) for n in ("plain", "shuffled_invalid_ids")]


@pytest.mark.parametrize("name,reduce", TOPK_TESTS, ids=[f"{n}-{r.value}" for n, r in TOPK_TESTS])
def test_bank_top_k_docs_exact(name, reduce):
  (ids, scores), (want_ids, want_scores), _ = _topk_results(reduce)[name]
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)  # bit-exact, -inf included
  assert ids.dtype == np.int32


@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_shortcut_certifies_itself(name):
  """The chunk-level shortcut is exact where it says so, and says so unless ties or a wrong Cmax
  leave it unsure (then bank_top_k_docs falls back to segment_max)."""
  _, (want_ids, want_scores), short = _topk_results(ChunkReduce.MAX)[name]
  expect_exact = TOPK_CASES[name][5]
  if short is None:
    assert name == "k_ge_docs"  # L >= C: bank_top_k_docs goes straight to the exact path
    return
  ids, scores, exact = short
  np.testing.assert_array_equal(ids[exact], want_ids[exact])
  np.testing.assert_array_equal(scores[exact], want_scores[exact])
  if expect_exact is not None:
    assert np.all(exact) == expect_exact


def test_top_chunks_is_top_k():
  """The block prefilter returns exactly lax.top_k (C = 1009 prime: padded; 1000, 4096 not)."""
  rng = np.random.default_rng(3)
  inputs = {c: (jnp.asarray(rng.standard_normal((2, c)).astype(np.float32)),
                jnp.asarray(rng.random(c) < 0.9)) for c in (1009, 1000, 4096)}

  @jax.jit
  def run(inputs):
    return {c: (ops_routing._top_chunks(cs, v, 50),
                jax.lax.top_k(jnp.where(v[None], cs, -jnp.inf), 50)) for c, (cs, v) in
            inputs.items()}

  for c, ((vals, idx, theta), (want_vals, _)) in jax.device_get(run(inputs)).items():
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(inputs[c][0]), idx, 1), vals)
    assert np.all(theta >= vals[:, -1])


# --- gather_doc_chunks --------------------------------------------------------------------------

def _gather_inputs(dtype):
  content = jnp.asarray((np.arange(23 * 2 * 4).reshape(23, 2, 4) % 97 + 1) / 4, dtype)
  off = jnp.array([0, 3, 4, 10, 20, 20], jnp.int32)
  cnt = jnp.array([3, 1, 6, 7, 3, 0], jnp.int32)
  sel = jnp.array([[4, 6, 2, -1], [5, 3, -1, 0], [0, 1, 2, 3]], jnp.int32)
  return content, off, cnt, sel


def _gather_by_hand(content, off, cnt, sel, cmax):
  content, off, cnt, sel = map(np.asarray, (content, off, cnt, sel))
  b, k = sel.shape
  out = np.zeros((b, k * cmax) + content.shape[1:], content.dtype)
  mask = np.zeros((b, k * cmax), bool)
  for i, j in np.ndindex(b, k):
    d = sel[i, j]
    if 0 <= d < len(off):
      n = min(cnt[d], cmax)
      out[i, j * cmax:j * cmax + n] = content[off[d]:off[d] + n]
      mask[i, j * cmax:j * cmax + n] = True
  return out, mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gather_doc_chunks(implementation, dtype):
  args = _gather_inputs(dtype)
  out, mask = ops.gather_doc_chunks(*args, max_chunks=5, implementation=implementation)
  want, want_mask = _gather_by_hand(*args, 5)
  assert out.shape == (3, 20, 2, 4) and out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32), want.astype(np.float32))
  np.testing.assert_array_equal(mask, want_mask)


# --- structure ----------------------------------------------------------------------------------

def test_only_ops_imports_pallas_kernels():
  """msa_jax reaches the Pallas kernels only through msa_jax.ops (lazily, on "pallas")."""
  import pathlib
  import msa_jax
  root = pathlib.Path(msa_jax.__file__).parent
  users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "pallas_kernels" in p.read_text() and p.parent.name != "ops")
  assert users == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion property")
def test_xla_scan_temporaries_stay_small():
  """The keys-as-LHS scan never materialises [C, rows] (XLA:CPU fuses the dot with the max over
  rows), which is why ScanConfig does not tile by default. C=200K, 64 rows: [C, 64] float32 would
  be 51 MB of temporaries."""
  s = jax.ShapeDtypeStruct
  c = 200_000
  for b, t in ((1, 64), (1, 1)):
    compiled = jax.jit(lambda q, qm, k, cv: ops.bank_chunk_scores(
        q, qm, k, cv, scale=1.0, head_reduce=HeadReduce.MEAN, query_reduce=QueryReduce.MAX)).lower(
            s((b, t, 2, 64), jnp.float32), s((b, t), jnp.bool_), s((c, 2, 64), jnp.bfloat16),
            s((c,), jnp.bool_)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 2 * b * c * 4  # ~ the [B, C] output
