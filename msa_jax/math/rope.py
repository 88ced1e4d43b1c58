"""Rotate-half rotary position embedding (HF convention) at arbitrary positions.

Positions are data, not `arange(T)`: document-wise RoPE restarts every document at 0 (SPEC §2).
"""

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., H] for integer `positions` [...], inv_freq = θ^(-2i/H)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)  # H/2
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # ... H/2
  angles = jnp.concatenate([angles, angles], axis=-1)  # ... H
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
  """Rotates x [..., T, N, H] by positions [..., T]; computed in float32, returned in x.dtype."""
  cos, sin = rope_angles(positions, x.shape[-1], theta)
  cos, sin = cos[..., None, :], sin[..., None, :]  # ... T 1 H
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)
