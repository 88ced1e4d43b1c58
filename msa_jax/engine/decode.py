"""Stage 3: decode against the per-layer caches of stage 2 (SPEC §8.3).

A new token attends to its layer's assembled cache (template, selected chunks, request and
generated tokens) plus itself. The memory bank is never touched: decode cost does not depend on
the bank size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from msa_jax.engine.prefill import DecodeState, LayerCache
from msa_jax.engine.sampling import Sampling, sample
from msa_jax.math import attention
from msa_jax.nn.model import MSAForCausalLM


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, dstate: DecodeState,
                tokens: jax.Array) -> tuple[jax.Array, DecodeState]:
  """Feeds tokens [B] at `dstate.next_position`; returns their logits [B, V] and the new state."""
  model: MSAForCausalLM = nnx.merge(graphdef, state)
  positions = dstate.next_position[:, None]
  x = model.embed(tokens[:, None])
  caches = []
  for layer, c in zip(model.layers, dstate.caches):
    _, q, k, v = layer.pre(x, positions)
    keys = jax.lax.dynamic_update_slice_in_dim(c.keys, k.astype(c.keys.dtype), c.length, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(c.values, v.astype(c.values.dtype), c.length,
                                                 axis=1)
    mask = jax.lax.dynamic_update_slice_in_dim(c.mask, jnp.ones((c.mask.shape[0], 1), bool),
                                               c.length, axis=1)
    x = layer.post(x, attention.attend(q, keys, values, mask[:, None, :]))
    caches.append(LayerCache(keys=keys, values=values, mask=mask, length=c.length + 1))
  logits = model.final_logits(x)[:, 0]
  return logits, DecodeState(caches=tuple(caches), next_position=dstate.next_position + 1,
                             last_logits=logits)


decode_step_jit = jax.jit(decode_step, static_argnums=(0,), donate_argnums=(2,))


@struct.dataclass
class Generated:
  tokens: jax.Array  # [B, N] int32; -1 after a row's stop token
  logits: jax.Array  # [N, B, V]: the distribution token n was drawn from


def generate(graphdef: nnx.GraphDef, state: nnx.State, dstate: DecodeState, max_new_tokens: int,
             *, sampling: Sampling = Sampling(), stop_tokens: tuple[int, ...] = (),
             key: jax.Array | None = None) -> Generated:
  """N tokens after stage 2: token 0 comes from the last prefill logits, each next one from the
  logits of feeding the previous token. Rows stop at a stop token (later entries -1); the loop
  ends when every row has stopped. The cache must have room for N - 1 tokens."""
  key = jax.random.key(0) if key is None else key
  # Steps donate their input state; one copy up front leaves the caller's state usable.
  dstate = jax.tree.map(jnp.copy, dstate)
  b = dstate.last_logits.shape[0]
  stop = jnp.asarray(stop_tokens if stop_tokens else [-1], jnp.int32)
  done = jnp.zeros((b,), bool)
  tokens, all_logits = [], []
  logits = dstate.last_logits
  for n in range(max_new_tokens):
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, sampling)
    tokens.append(jnp.where(done, -1, tok))
    all_logits.append(logits)
    done = done | jnp.isin(tok, stop)
    if n == max_new_tokens - 1 or bool(jnp.all(done)):
      break
    logits, dstate = decode_step_jit(graphdef, state, dstate, tok)
  pad = max_new_tokens - len(tokens)
  toks = jnp.stack(tokens, axis=1)
  lg = jnp.stack(all_logits, axis=0)
  if pad:
    toks = jnp.pad(toks, [(0, 0), (0, pad)], constant_values=-1)
    lg = jnp.pad(lg, [(0, pad), (0, 0), (0, 0)])
  return Generated(tokens=toks, logits=lg)
