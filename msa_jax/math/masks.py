"""Attention masks of the training path (SPEC §4). True = the query may attend to the key.

- Document tokens: causal within their own document only (every layer).
- Active tokens (query, answer, template: doc_ids < 1): causal among active tokens only.
- Router layers add memory: an active token sees every chunk of the selected documents whose
  first token comes before it in the sequence (the official code merges chunks into the sequence
  at that index, then applies one causal mask).
"""

import jax
import jax.numpy as jnp

from msa_jax.math import roles


def token_mask(doc_ids: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, T] roles and validity -> [B, T, T] token-to-token mask (sequence-order causal)."""
  t = doc_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  active = doc_ids < roles.FIRST_DOC
  group = jnp.where(active, 0, doc_ids)  # all active tokens form one group
  same = group[:, :, None] == group[:, None, :]
  both_valid = valid[:, :, None] & valid[:, None, :]
  return causal[None] & same & both_valid


def memory_mask(doc_ids: jax.Array, valid: jax.Array, chunk_start: jax.Array,
                chunk_selected: jax.Array) -> jax.Array:
  """[B, T, C]: active token i sees selected chunk c iff chunk_start[c] < i."""
  t = doc_ids.shape[1]
  active = valid & (doc_ids < roles.FIRST_DOC)  # B T
  after = chunk_start[:, None, :] < jnp.arange(t)[None, :, None]  # B T C
  return active[:, :, None] & chunk_selected[:, None, :] & after
