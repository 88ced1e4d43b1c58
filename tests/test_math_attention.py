"""Masked grouped-query attention (SPEC §3) against a float64 NumPy reference.

out[t, h] = Σ_s softmax_s(scale · <q[t, h], k[s, ⌊h/G⌋]> over admissible s) · v[s, ⌊h/G⌋];
a row with no admissible key outputs exactly 0. Default scale 1/√H.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.math import attention

ATOL = 1e-5
RTOL = 1e-5

# One compile per shape each: the default scale, and an explicit (traced) scale.
attend_default = jax.jit(attention.attend)
attend_scaled = jax.jit(lambda q, k, v, mask, scale: attention.attend(q, k, v, mask, scale=scale))


def attend(q, k, v, mask, scale=None):
  return attend_default(q, k, v, mask) if scale is None else attend_scaled(q, k, v, mask, scale)


def ref_attend(q, k, v, mask, scale=None):
  b, t, n, h = q.shape
  g = n // k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros((b, t, n, h))
  for r, i, hh in np.ndindex(b, t, n):
    keys = np.flatnonzero(mask[r, i])
    if keys.size == 0:
      continue
    logits = scale * np.array([np.dot(q[r, i, hh], k[r, s, hh // g]) for s in keys])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    out[r, i, hh] = sum(w * v[r, s, hh // g] for w, s in zip(p, keys))
  return out


def random_case(num_heads, num_kv_heads, t=6, s=9, h=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, t, num_heads, h)).astype(np.float32)
  k = rng.standard_normal((2, s, num_kv_heads, h)).astype(np.float32)
  v = rng.standard_normal((2, s, num_kv_heads, h)).astype(np.float32)
  mask = rng.random((2, t, s)) < 0.5
  mask[0, 1] = False  # rows with no admissible key
  mask[1, 4] = False
  mask[1, 0] = False
  mask[1, 0, 3] = True  # a row with exactly one key
  return q, k, v, mask


@pytest.mark.parametrize("num_heads,num_kv_heads,scale", [
    (3, 3, 0.7), (4, 2, None), (4, 2, 0.7), (6, 2, 0.7), (4, 1, 0.7),
], ids=["G1", "G2_default_scale", "G2", "G3", "MQA"])
def test_attend_matches_reference(num_heads, num_kv_heads, scale):
  q, k, v, mask = random_case(num_heads, num_kv_heads, seed=num_heads + num_kv_heads)
  got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=scale)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref_attend(q, k, v, mask, scale), atol=ATOL, rtol=RTOL)


def test_rows_without_admissible_keys_output_exactly_zero():
  q, k, v, mask = random_case(4, 2)
  got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
  assert np.all(got[0, 1] == 0.0) and np.all(got[1, 4] == 0.0)
  np.testing.assert_allclose(got[1, 0], np.stack([v[1, 3, 0]] * 2 + [v[1, 3, 1]] * 2), atol=ATOL)


def test_default_scale_is_one_over_sqrt_head_dim():
  q, k, v, mask = random_case(4, 2, seed=5)
  a = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=None))
  b = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                        scale=8 ** -0.5))
  c = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=2.0))
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
  assert np.abs(a - c).max() > 1e-2


def test_gradients_are_finite_with_fully_masked_rows():
  q, k, v, mask = random_case(4, 2, seed=2)

  def loss(q, k, v):
    return jnp.sum(attention.attend(q, k, v, jnp.asarray(mask)) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[0, 1] == 0.0), "a row that sees nothing gets no gradient"
