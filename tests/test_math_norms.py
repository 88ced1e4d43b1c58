"""RMSNorm and L2 normalisation (SPEC §3, §5, §6) against float64 NumPy references.

rms(x) = x · 1/sqrt(mean(x²) + eps) · w over the last axis; normalize(x) = x / max(‖x‖₂, eps)
(torch.nn.functional.normalize), so the zero vector maps to zero.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from msa_jax.math import norms

ATOL = 1e-5  # float32 computation vs float64 reference
RTOL = 1e-5
BF16_RTOL = 1e-2  # one bfloat16 rounding (8 mantissa bits)

rms_norm = jax.jit(norms.rms_norm)  # eps traced: one compile per shape
l2_normalize = jax.jit(norms.l2_normalize, static_argnames="eps")


def ref_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx]
    out[idx] = row / np.sqrt(np.sum(row * row) / row.size + eps) * w
  return out


def ref_l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx]
    out[idx] = row / max(np.sqrt(np.sum(row * row)), eps)
  return out


def f32(rng, *shape, scale=1.0):
  """Random float32 array (the reference then reads exactly the same values)."""
  return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(1,), (13,), (3, 1), (2, 5, 7), (2, 3, 4, 6)])
def test_rms_norm_matches_reference_on_awkward_shapes(shape):
  rng = np.random.default_rng(sum(shape))
  x = f32(rng, *shape, scale=3.0)
  w = rng.uniform(0.3, 2.0, shape[-1]).astype(np.float32)
  for eps in (1e-6, 1e-2):
    got = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), eps))
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, ref_rms_norm(x, w, eps), atol=ATOL, rtol=RTOL, err_msg=f"eps={eps}")


def test_rms_norm_eps_matters_for_small_inputs():
  """eps sits inside the square root: tiny rows are damped, not blown up to unit RMS."""
  rng = np.random.default_rng(0)
  x = f32(rng, 4, 8, scale=1e-3)
  w = np.ones(8, np.float32)
  got = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-4))
  np.testing.assert_allclose(got, ref_rms_norm(x, w, 1e-4), atol=ATOL, rtol=RTOL)
  assert np.all(np.sqrt(np.mean(got.astype(np.float64) ** 2, -1)) < 0.2)


def test_rms_norm_normalises_in_float32_then_casts_back_before_the_weight():
  """HF Qwen3: y = float32 normalisation, cast to x's dtype, then times the weight (same dtype)."""
  rng = np.random.default_rng(1)
  x = f32(rng, 3, 16, scale=5.0).astype(ml_dtypes.bfloat16)
  w = rng.uniform(0.5, 1.5, 16).astype(ml_dtypes.bfloat16)
  got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)
  assert got.dtype == jnp.bfloat16
  y = ref_rms_norm(x.astype(np.float64), np.ones(16), 1e-6).astype(ml_dtypes.bfloat16)
  want = (y.astype(np.float64) * w.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=BF16_RTOL, atol=0)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 4, 3, 6), (1, 1)])
def test_l2_normalize_matches_reference(shape):
  rng = np.random.default_rng(len(shape) + shape[-1])
  x = f32(rng, *shape, scale=4.0)
  got = np.asarray(l2_normalize(jnp.asarray(x)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref_l2_normalize(x), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=-1), 1.0, atol=ATOL)


def test_l2_normalize_maps_the_zero_vector_to_zero():
  x = np.zeros((3, 2, 8), np.float32)
  x[1, 0] = np.arange(8)  # one non-zero vector among zeros
  got = np.asarray(l2_normalize(jnp.asarray(x)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_allclose(got, ref_l2_normalize(x), atol=ATOL, rtol=RTOL)


def test_l2_normalize_uses_max_of_norm_and_eps():
  """A vector shorter than eps is divided by eps (torch semantics), not by its own norm."""
  x = np.array([[3e-4, 4e-4]], np.float32)  # norm 5e-4
  got = np.asarray(l2_normalize(jnp.asarray(x), eps=1e-2))
  np.testing.assert_allclose(got, ref_l2_normalize(x, eps=1e-2), atol=1e-7, rtol=RTOL)
  np.testing.assert_allclose(got, [[3e-2, 4e-2]], rtol=RTOL)


def test_l2_normalize_gradient_is_finite_at_the_zero_vector():
  """Unused chunk slots pool to exactly zero routing keys; their gradient must not be NaN.

  torch.nn.functional.normalize (whose semantics l2_normalize follows) has the finite gradient
  x̄ / eps at x = 0. Today the NaN stays confined to unused slots only because the scores of
  those slots are masked with `where` and segment_sum's transpose drops them.
  """
  x = jnp.zeros((2, 4), jnp.float32).at[0].set(jnp.array([1.0, 2.0, 2.0, 0.0]))
  g = jax.jit(jax.grad(lambda v: jnp.sum(norms.l2_normalize(v) * jnp.arange(4.0))))(x)
  assert np.all(np.isfinite(np.asarray(g))), np.asarray(g)
