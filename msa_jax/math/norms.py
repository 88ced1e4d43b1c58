"""Normalisations: RMSNorm (Qwen3, in float32) and per-vector L2 normalisation."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """`x * rsqrt(mean(x²) + eps) * scale` over the last axis, computed in float32.

  x: [..., D]; scale: [D]. The HF Qwen3 convention: normalise in float32, cast back to x's dtype,
  then multiply by the weight (so the result has the promoted dtype of x and scale).
  """
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖₂, eps) over the last axis (torch.nn.functional.normalize semantics).

  Written with rsqrt of the clamped squared norm so that the gradient at the zero vector (empty
  chunk slots pool to zeros) is finite, as in torch.
  """
  xf = x.astype(jnp.float32)
  sq = jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), eps * eps)
  return (xf * jax.lax.rsqrt(sq)).astype(x.dtype)
