"""Losses (SPEC §7): shifted LM cross-entropy and the InfoNCE routing loss."""

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 0.5


def shifted_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy: logits [B, T, V] at t predict labels [B, T] at t+1.

  Returns (sum of per-token losses, number of labelled tokens), both float32 scalars, so that
  callers can average over any set of rows. Labels equal to -100 are ignored.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  keep = target != IGNORE_INDEX
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(keep, picked, 0.0)), jnp.sum(keep).astype(jnp.float32)


def lm_loss(logits: jax.Array, labels: jax.Array, rows: jax.Array | None = None) -> jax.Array:
  """Mean shifted cross-entropy over labelled tokens of the rows selected by `rows` [B] (all if None).

  0 when nothing is labelled.
  """
  if rows is not None:
    labels = jnp.where(rows[:, None], labels, IGNORE_INDEX)
  total, count = shifted_cross_entropy(logits, labels)
  return total / jnp.maximum(count, 1.0)


def infonce_loss(doc_scores: jax.Array, positives: jax.Array, temperature: jax.Array) -> tuple[
    jax.Array, jax.Array]:
  """Per-sample InfoNCE over the present documents.

  doc_scores: [B, M] (index = document id; -inf = absent); positives: [B, M] bool multi-hot in the
  same indexing. Returns (loss [B], has_docs [B] bool): loss_b = -Σ_d y_d·log_softmax(s/τ)_d /
  max(1, Σ y) over present documents, τ clamped to [1e-3, 0.5].
  """
  tau = jnp.clip(temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
  present = doc_scores > -jnp.inf
  # A finite stand-in for absent documents keeps gradients free of inf·0.
  logits = jnp.where(present, doc_scores, 0.0) / tau
  logits = jnp.where(present, logits, -1e30)
  logp = jax.nn.log_softmax(logits, axis=-1)
  y = positives & present
  loss = -jnp.sum(jnp.where(y, logp, 0.0), axis=-1) / jnp.maximum(jnp.sum(y, axis=-1), 1)
  return loss, jnp.any(present, axis=-1)
