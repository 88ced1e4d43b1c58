"""Routing-score kernel (pallas_kernels/routing_scores) against its plain-jnp reference.

The reference is first checked on a hand-computed case and against msa_jax.math.routing; then
the kernel is checked against the reference over dtype x shape x tile size x (head, query)
reduction. `RoutingScoresTest` runs the kernel compiled (GPU only); the `...InterpretTest`
subclass flips INTERPRET so the same suite runs on CPU in the Pallas interpreter.

Interpret mode compiles slowly, so every kernel call of one (class, dtype) is traced into ONE
jitted function (computed once, cached in `_RESULTS`) and the parameterised tests read their
slice of it.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.config import HeadReduce, QueryReduce
from msa_jax.math import routing
from pallas_kernels.routing_scores import (RoutingScoresConfig, routing_scores,
                                           routing_scores_reference)

reference = jax.jit(routing_scores_reference, static_argnames=("head_reduce", "query_reduce"))

REDUCTIONS = list(itertools.product(HeadReduce, QueryReduce))
# name: (B, T, N, K, H, C)
SHAPES = {
    "tail_gqa1": (2, 5, 2, 2, 16, 37),  # C not a multiple of any tile, GQA groups 1
    "gqa3": (3, 4, 6, 2, 32, 64),  # GQA groups 3, C a multiple of every tile, B not a power of 2
    "one_chunk": (1, 1, 3, 1, 16, 1),  # one chunk, one routing token
}
BLOCKS = (8, 32)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# |kernel - reference| on scores of unit vectors. bfloat16: the kernel rounds the group-summed,
# scaled queries to bfloat16 (relative 2^-9) before the dot; the reference keeps them in float32.
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
SCALE = 0.7
# Interpret-mode programs are big; XLA's backend optimisations only cost compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(shape, dtype, seed=0):
  """Unit-norm q [B, T, N, H] and keys [C, K, H]; a random routing mask with a sample that has no
  routing token (when B > 1); random invalid chunks. NumPy-built: eager jax ops compile one by one."""
  b, t, n, k, h, c = shape
  rng = np.random.default_rng(seed)
  q = jnp.asarray(_unit(rng.standard_normal((b, t, n, h))), dtype)
  keys = jnp.asarray(_unit(rng.standard_normal((c, k, h))), dtype)
  qm = rng.random((b, t)) < 0.6
  qm[0, 0] = True
  if b > 1:
    qm[-1] = False
  cv = rng.random(c) < 0.8
  cv[0] = True
  return q, jnp.asarray(qm), keys, jnp.asarray(cv)


def cases(dtype_name):
  """(shape, block_c, head, query) tested for a dtype, covering every reduction several times.

  float32: all six reductions on the tail shape with the small tile, two rotating ones on the
  others; bfloat16 (same kernel code, rounding differs): one rotating one everywhere.
  """
  out = []
  configs = [(n, b) for n, b in itertools.product(SHAPES, BLOCKS)
             if not (n == "one_chunk" and b != BLOCKS[0])]  # C=1 is one padded tile anyway
  for i, (name, block) in enumerate(configs):
    full = dtype_name == "float32" and (name, block) == ("tail_gqa1", BLOCKS[0])
    for j, (hr, qr) in enumerate(REDUCTIONS):
      picks = (i % 6, (i + 4) % 6) if dtype_name == "float32" else ((i + 2) % 6,)
      if full or j in picks:
        out.append((name, block, hr, qr))
  return out


CASES = {d: cases(d) for d in DTYPES}
ALL_CASES = [(d,) + c for d in DTYPES for c in CASES[d]]
_RESULTS = {}


def _results(interpret: bool, dtype_name: str):
  """{case: (kernel, reference)} for every case, from one jitted call."""
  key = (interpret, dtype_name)
  if key not in _RESULTS:
    dtype = DTYPES[dtype_name]
    inputs = {name: make_inputs(shape, dtype) for name, shape in SHAPES.items()}

    def run_all(inputs):
      out = []
      for name, block, hr, qr in CASES[dtype_name]:
        q, qm, keys, cv = inputs[name]
        got = routing_scores(q, qm, keys, cv, SCALE, head_reduce=hr, query_reduce=qr,
                             config=RoutingScoresConfig(block_c=block), interpret=interpret)
        want = routing_scores_reference(q, qm, keys, cv, SCALE, head_reduce=hr, query_reduce=qr)
        out.append((got, want))
      return out

    fn = jax.jit(run_all, compiler_options=FAST_COMPILE if interpret else None)
    res = jax.device_get(fn(inputs))
    _RESULTS[key] = dict(zip(CASES[dtype_name], res))
  return _RESULTS[key]


def assert_scores_close(got, want, atol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  assert np.all(np.isfinite(got[fin]))
  np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=atol)


# --- the reference itself -----------------------------------------------------------------------

def _hand_case():
  # B=2, T=2, N=2, K=1 (G=2), H=2, C=2; scale 0.5.
  q = np.zeros((2, 2, 2, 2), np.float32)
  q[0, 0, 0], q[0, 0, 1] = [1, 0], [0, 1]
  q[0, 1, 0], q[0, 1, 1] = [1, 1], [-1, 3]
  q[1] = q[0]
  keys = np.array([[[1, 0]], [[0, 2]]], np.float32)  # C=2, K=1, H=2
  # 0.5·s[t, n, c]: t0: n0 [0.5, 0], n1 [0, 1];  t1: n0 [0.5, 1], n1 [-0.5, 3]
  # head mean: t0 [0.25, 0.5], t1 [0, 2];        head max: t0 [0.5, 1], t1 [0.5, 3]
  return q, keys


HAND_BOTH_TOKENS = {
    (HeadReduce.MEAN, QueryReduce.MAX): [0.25, 2.0],
    (HeadReduce.MEAN, QueryReduce.MEAN): [0.125, 1.25],
    (HeadReduce.MEAN, QueryReduce.LAST): [0.0, 2.0],
    (HeadReduce.MAX, QueryReduce.MAX): [0.5, 3.0],
    (HeadReduce.MAX, QueryReduce.MEAN): [0.5, 2.0],
    (HeadReduce.MAX, QueryReduce.LAST): [0.5, 3.0],
}


@pytest.mark.parametrize("hr,qr", REDUCTIONS, ids=lambda x: x.value)
def test_reference_hand_computed(hr, qr):
  q, keys = _hand_case()
  # sample 0 routes with both tokens; sample 1 has none (-inf); chunk 1 invalid in the second call
  qm = np.array([[True, True], [False, False]])
  got = reference(q, qm, keys, np.array([True, True]), 0.5, head_reduce=hr, query_reduce=qr)
  np.testing.assert_allclose(np.asarray(got[0]), HAND_BOTH_TOKENS[hr, qr], rtol=1e-6)
  assert np.all(np.isneginf(np.asarray(got[1])))
  # only token 0 routes: every query reduction gives token 0's head-reduced scores
  first = {HeadReduce.MEAN: [0.25, 0.5], HeadReduce.MAX: [0.5, 1.0]}[hr]
  got = reference(q, np.array([[True, False], [True, False]]), keys, np.array([True, False]), 0.5,
                  head_reduce=hr, query_reduce=qr)
  np.testing.assert_allclose(np.asarray(got[:, 0]), [first[0]] * 2, rtol=1e-6)
  assert np.all(np.isneginf(np.asarray(got[:, 1])))


def test_reference_matches_math_routing():
  """The kernel's reference agrees with msa_jax.math.routing.chunk_scores (the model's math)."""
  b, t, n, k, h, c = SHAPES["gqa3"]

  @jax.jit
  def both(q, qm, keys, cv):
    out = []
    for hr, qr in REDUCTIONS:
      want = routing.chunk_scores(q, qm, jnp.broadcast_to(keys[None], (b, c, k, h)),
                                  jnp.broadcast_to(cv[None], (b, c)), scale=SCALE,
                                  head_reduce=hr, query_reduce=qr)
      out.append((routing_scores_reference(q, qm, keys, cv, SCALE, head_reduce=hr,
                                           query_reduce=qr), want))
    return out

  for got, want in both(*make_inputs(SHAPES["gqa3"], jnp.float32, seed=3)):
    assert_scores_close(got, want, 1e-5)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(block_c=48), "self.block_c=48 must be a power of 2"),
    (dict(min_block_t=12), "self.min_block_t=12 must be a power of 2"),
    (dict(num_warps=3), "self.num_warps=3 must be a power of 2"),
    (dict(num_stages=0), "self.num_stages=0 must be >= 1"),
])
def test_config_validates(kw, msg):
  with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
    RoutingScoresConfig(**kw)


def test_shape_errors():
  q, qm, keys, cv = make_inputs(SHAPES["gqa3"], jnp.float32)
  with pytest.raises(ValueError, match="does not match keys"):
    routing_scores(q[..., :5, :], qm, keys, cv, 1.0, head_reduce=HeadReduce.MEAN,
                   query_reduce=QueryReduce.MAX, interpret=True)


# --- kernel vs reference ------------------------------------------------------------------------

class RoutingScoresTest:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas kernels need a GPU; see the InterpretTest subclass")

  @pytest.mark.parametrize("dtype,name,block,hr,qr", ALL_CASES,
                           ids=[f"{d}-{n}-c{b}-{h.value}-{q.value}" for d, n, b, h, q in ALL_CASES])
  def test_parity(self, dtype, name, block, hr, qr):
    got, want = _results(self.INTERPRET, dtype)[name, block, hr, qr]
    assert_scores_close(got, want, TOL[dtype])


class TestRoutingScores(RoutingScoresTest):
  INTERPRET = False


class TestRoutingScoresInterpret(RoutingScoresTest):
  INTERPRET = True
