"""Masked grouped-query attention (GQA without repeating kv heads)."""

import jax
import jax.numpy as jnp


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           scale: float | None = None) -> jax.Array:
  """softmax(q·kᵀ·scale, masked) · v with query head n using kv head n // G.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool (True = attend).
  Rows with no admissible key output 0 (padding, and flash-attention's convention).
  Returns [B, T, N, H] in q.dtype; logits and softmax in float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  m = mask[:, None, None, :, :]
  logits = jnp.where(m, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(m, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)
