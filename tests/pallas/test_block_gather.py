"""Block-gather kernel (pallas_kernels/block_gather) against its plain-jnp reference.

The reference is first checked on a hand-written case; then the kernel against the reference
over dtype x shape x block_rows. `BlockGatherTest` runs the kernel compiled (GPU only); the
`...InterpretTest` subclass flips INTERPRET so the same suite runs on CPU. All kernel calls of
one (class, dtype) share one jitted function (interpret mode compiles slowly).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_gather import BlockGatherConfig, block_gather, block_gather_reference

reference = jax.jit(block_gather_reference, static_argnames="max_chunks")

FAST_COMPILE = {"xla_backend_optimization_level": 0}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BLOCK_ROWS = (None, 1, 2)

# name: (C, K, H, offsets, counts, selected [B, k], Cmax)
SHAPES = {
    # k >= documents: 5 slots for 3 documents; -1 padding
    "k_ge_docs": (10, 2, 8, [0, 4, 7], [4, 3, 3], [[2, 0, 1, -1, -1], [1, -1, -1, -1, -1]], 4),
    # the last document ends exactly at the end of an unpadded bank; Cmax=5 (not a power of 2);
    # an id past M, an empty document (count 0) and a count above Cmax (truncated)
    "bank_end": (23, 1, 16, [0, 3, 4, 10, 20, 20], [3, 1, 6, 7, 3, 0],
                 [[4, 6, 2], [5, 3, -1], [0, 1, 4]], 5),
    "one_chunk": (1, 2, 4, [0], [1], [[0]], 1),
}


def make_inputs(name, dtype):
  c, k, h, off, cnt, sel, cmax = SHAPES[name]
  content = (np.arange(c * k * h, dtype=np.float32).reshape(c, k, h) % 251 + 1) / 8
  return (jnp.asarray(content, dtype), jnp.asarray(off, jnp.int32), jnp.asarray(cnt, jnp.int32),
          jnp.asarray(sel, jnp.int32)), cmax


CASES = list(itertools.product(SHAPES, BLOCK_ROWS))
ALL_CASES = [(d, n, r) for d in DTYPES for n, r in CASES]
_RESULTS = {}


def _results(interpret: bool, dtype_name: str):
  key = (interpret, dtype_name)
  if key not in _RESULTS:
    inputs = {n: make_inputs(n, DTYPES[dtype_name]) for n in SHAPES}

    def run_all(arrays):
      out = []
      for name, rows in CASES:
        cmax = inputs[name][1]
        got = block_gather(*arrays[name], max_chunks=cmax,
                           config=BlockGatherConfig(block_rows=rows), interpret=interpret)
        out.append((got, block_gather_reference(*arrays[name], max_chunks=cmax)))
      return out

    fn = jax.jit(run_all, compiler_options=FAST_COMPILE if interpret else None)
    res = jax.device_get(fn({n: a for n, (a, _) in inputs.items()}))
    _RESULTS[key] = dict(zip(CASES, res))
  return _RESULTS[key]


# --- the reference itself -----------------------------------------------------------------------

def test_reference_hand_written():
  content = np.arange(6, dtype=np.float32).reshape(6, 1, 1) + 10  # rows 10..15
  off = np.array([0, 2, 5])
  cnt = np.array([2, 3, 1])
  sel = np.array([[1, -1, 2], [3, 0, 0]])  # 3 is out of range -> none; a repeat is allowed
  out, mask = reference(content, off, cnt, sel, max_chunks=3)
  np.testing.assert_array_equal(np.asarray(out)[..., 0, 0], [
      [12, 13, 14, 0, 0, 0, 15, 0, 0],
      [0, 0, 0, 10, 11, 0, 10, 11, 0],
  ])
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(out)[..., 0, 0] != 0)


def test_reference_truncates_to_max_chunks():
  content = np.arange(4, dtype=np.float32).reshape(4, 1, 1) + 1
  out, mask = reference(content, np.array([0]), np.array([4]), np.array([[0]]), max_chunks=2)
  np.testing.assert_array_equal(np.asarray(out)[0, :, 0, 0], [1, 2])
  assert np.all(np.asarray(mask))


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(block_rows=3), r"self.block_rows=3 must be a power of 2"),
    (dict(num_warps=6), r"self.num_warps=6 must be a power of 2"),
    (dict(num_stages=0), r"self.num_stages=0 must be >= 1"),
])
def test_config_validates(kw, msg):
  with pytest.raises(ValueError, match=msg):
    BlockGatherConfig(**kw)


def test_config_default_rows():
  assert BlockGatherConfig().rows(5) == 8
  assert BlockGatherConfig().rows(1000) == 64
  assert BlockGatherConfig(block_rows=4).rows(5) == 4


# --- kernel vs reference ------------------------------------------------------------------------

class BlockGatherTest:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas kernels need a GPU; see the InterpretTest subclass")

  @pytest.mark.parametrize("dtype,name,rows", ALL_CASES,
                           ids=[f"{d}-{n}-rows{r}" for d, n, r in ALL_CASES])
  def test_parity(self, dtype, name, rows):
    (got, got_mask), (want, want_mask) = _results(self.INTERPRET, dtype)[name, rows]
    c, k, h, _, _, sel, cmax = SHAPES[name]
    assert got.shape == (len(sel), len(sel[0]) * cmax, k, h)
    assert got.dtype == DTYPES[dtype]
    # a copy: bit-exact, padding rows exactly zero
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(got_mask, want_mask)
    assert not np.any(np.asarray(got, np.float32)[~np.asarray(got_mask)])


class TestBlockGather(BlockGatherTest):
  INTERPRET = False


class TestBlockGatherInterpret(BlockGatherTest):
  INTERPRET = True
