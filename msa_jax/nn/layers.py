"""Thin NNX modules. They own parameters and call `msa_jax.math`; they hold no routing logic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msa_jax.math import norms


class Buffer(nnx.Variable):
  """A non-trainable checkpoint tensor (the official scalar `temperature`)."""


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return norms.rms_norm(x, self.scale[...], self.eps)


class Linear(nnx.Module):
  """y = x · kernel, kernel [in, out] (the transpose of torch's weight), no bias."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, std: float = 0.02,
               dtype=jnp.float32):
    self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x, self.kernel[...], preferred_element_type=jnp.float32).astype(x.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
    self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (vocab, dim), dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x [..., D] -> [..., V]."""
    return jnp.dot(x, self.embedding[...].T, preferred_element_type=jnp.float32)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate_proj = Linear(dim, hidden, rngs=rngs)
    self.up_proj = Linear(dim, hidden, rngs=rngs)
    self.down_proj = Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
