"""Token sampling from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy (argmax, ties to the lower id); top_p in (0, 1] keeps the smallest set
  of tokens whose probability reaches top_p."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan: always token 0
      raise ValueError(f"{self.temperature=} must be a finite number >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"{self.top_p=} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> tokens [B] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep_sorted = before < sampling.top_p  # always keeps the best token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
