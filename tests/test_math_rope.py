"""Rotary position embedding (SPEC §2-§3) against a float64 NumPy reference.

HF "rotate-half": for i < H/2 with angle a = p · θ^(-2i/H),
  out[i]       = x[i] cos a − x[i + H/2] sin a
  out[i + H/2] = x[i + H/2] cos a + x[i] sin a.
Positions are data (document-wise: restart at 0 per document, may repeat and go backwards).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from msa_jax.math import rope

ATOL = 2e-5  # float32 angles (p · inv_freq, p < 64) and cos/sin vs float64
RTOL = 1e-5
BF16_RTOL = 1e-2

# Jitted once per shape: much cheaper than eager dispatch of every op.
apply_rope = jax.jit(rope.apply_rope)  # theta traced: one compile per shape

# Document-wise positions of a packed row: template 0..2, docs restarting at 0, active tokens
# from t + k; then repeated and non-monotone values.
PACKED_POSITIONS = [0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 3, 4, 6, 7, 8, 9, 9, 3, 0, 41, 17]


def ref_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """x [..., T, N, H], positions [..., T] -> rotated, written element by element."""
  x = np.asarray(x, np.float64)
  h = x.shape[-1]
  half = h // 2
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-2]):  # ..., T
    p = float(positions[idx])
    for i in range(half):
      a = p * theta ** (-2.0 * i / h)
      c, s = np.cos(a), np.sin(a)
      lo, hi = x[idx][:, i], x[idx][:, i + half]
      out[idx][:, i] = lo * c - hi * s
      out[idx][:, i + half] = hi * c + lo * s
  return out


@pytest.mark.parametrize("batch,num_heads,head_dim", [(1, 1, 2), (2, 3, 6), (3, 2, 16)])
def test_apply_rope_matches_reference_at_packed_positions(batch, num_heads, head_dim):
  rng = np.random.default_rng(head_dim)
  t = len(PACKED_POSITIONS)
  positions = np.stack([np.roll(PACKED_POSITIONS, r) for r in range(batch)]).astype(np.int32)
  x = rng.standard_normal((batch, t, num_heads, head_dim)).astype(np.float32)
  for theta in (10_000.0, 1_000_000.0):
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=theta))
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, ref_rope(x, positions, theta), atol=ATOL, rtol=RTOL,
                               err_msg=f"theta={theta}")


def test_apply_rope_without_batch_axis():
  rng = np.random.default_rng(7)
  positions = np.array([5, 0, 3, 3, 1], np.int32)
  x = rng.standard_normal((5, 4, 8)).astype(np.float32)
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=500.0))
  np.testing.assert_allclose(got, ref_rope(x, positions, 500.0), atol=ATOL, rtol=RTOL)


def test_position_zero_is_the_identity():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 3, 2, 10)).astype(np.float32)
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.zeros((2, 3), jnp.int32), theta=1e4))
  np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("i", [0, 1, 3])
def test_inv_freq_is_theta_to_the_minus_2i_over_h(i):
  """Unit vector e_i rotated by position p lands on (cos a, sin a) in dims (i, i + H/2)."""
  h, theta, p = 8, 10_000.0, 3
  x = np.zeros((1, 1, h), np.float32)
  x[0, 0, i] = 1.0
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.array([p]), theta=theta))[0, 0]
  a = p * theta ** (-2.0 * i / h)
  want = np.zeros(h)
  want[i], want[i + h // 2] = np.cos(a), np.sin(a)
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_scores_depend_only_on_relative_position():
  """<rope(q, p + s), rope(k, r + s)> = <rope(q, p), rope(k, r)> for every shift s."""
  rng = np.random.default_rng(11)
  q = rng.standard_normal((1, 1, 12)).astype(np.float32)
  k = rng.standard_normal((1, 1, 12)).astype(np.float32)

  def score(p, r):
    qr = apply_rope(jnp.asarray(q), jnp.array([p]), theta=100.0)
    kr = apply_rope(jnp.asarray(k), jnp.array([r]), theta=100.0)
    return float(jnp.sum(qr * kr))

  base = score(2, 5)
  for s in (1, 4, 20):
    assert score(2 + s, 5 + s) == pytest.approx(base, abs=1e-4)
  assert abs(score(2, 6) - base) > 1e-3  # and it does depend on the offset


def test_apply_rope_keeps_bfloat16():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 6, 2, 8)).astype(ml_dtypes.bfloat16)
  positions = np.array([[0, 3, 1, 0, 7, 2]], np.int32)
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=1e4)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), ref_rope(x.astype(np.float64), positions, 1e4),
                             rtol=BF16_RTOL, atol=BF16_RTOL)
