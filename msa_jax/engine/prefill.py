"""Stage 2: route and prefill a batch of requests against a memory bank (SPEC §8.2).

Every layer runs the request tokens; at a router layer the request's role-0 tokens score every
chunk of the bank, the top-k documents are selected, only their K̄/V̄ chunks are fetched, and the
request attends over `[template ; selected chunks ; request]` with every request token seeing the
whole prefix (bottom-right aligned causal mask). Non-router layers attend over
`[template ; request]`. The per-layer K/V become the decode cache (stage 3), with room for
`max_new_tokens` more tokens. Selection is made once here and stays frozen while decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from msa_jax.math import attention, norms, roles
from msa_jax.memory.bank import MemoryBank, Template
from msa_jax.memory.index import ContentSource, RoutingIndex
from msa_jax.nn.model import MSAForCausalLM


class RequestError(ValueError):
  """A request batch that violates the SPEC §13 conventions for stage 2."""


@struct.dataclass
class Request:
  """Request tokens [B, T] (left or right padded): roles 0 (routes), -1, -2; no documents."""

  input_ids: jax.Array
  doc_ids: jax.Array
  attention_mask: jax.Array
  position_ids: jax.Array

  @classmethod
  def from_arrays(cls, arrays, vocab_size: int | None = None) -> "Request":
    """Validates numpy arrays (e.g. an `.npz`). Token ids must lie in [0, vocab_size) (only the
    sign is checked without it) and positions be >= 0 on valid tokens; padding (attention_mask
    0) may hold anything. Raises `RequestError`."""
    names = ("input_ids", "doc_ids", "attention_mask", "position_ids")
    missing = [n for n in names if n not in arrays]
    if missing:
      raise RequestError(f"request lacks arrays {missing}")
    a = {n: np.asarray(arrays[n]) for n in names}
    shape = a["input_ids"].shape
    if len(shape) != 2:
      raise RequestError(f"input_ids must be [B, T], got shape {shape}")
    for n, v in a.items():
      if v.shape != shape:
        raise RequestError(f"{n} has shape {v.shape}, expected {shape}")
      if not np.issubdtype(v.dtype, np.integer):
        raise RequestError(f"{n} must be an integer array, got dtype {v.dtype}")
    valid = a["attention_mask"].astype(bool)
    bad = valid & ((a["doc_ids"] >= roles.FIRST_DOC) | (a["doc_ids"] < roles.TEMPLATE))
    if bad.any():
      raise RequestError("request doc_ids must be roles 0, -1 or -2 (documents live in the bank)")
    if not valid.any(axis=1).all():
      raise RequestError(f"rows {np.flatnonzero(~valid.any(1)).tolist()} have no valid token")
    # The model embeds padding too: a pad id outside the vocabulary would be NaN and reach the
    # valid tokens through attention (0 · NaN), so padding becomes token 0.
    a["input_ids"] = np.where(valid, a["input_ids"], 0)
    error = roles.token_range_error(a["input_ids"], a["position_ids"], valid, vocab_size)
    if error:
      raise RequestError(error)
    return cls(**{n: jnp.asarray(v.astype(np.int32)) for n, v in a.items()})

  def check(self, vocab_size: int) -> None:
    """Raises `RequestError` unless every token id is in [0, vocab_size) and valid positions are
    >= 0 (a request built without `from_arrays` is checked here)."""
    ids, pos, mask = jax.device_get((self.input_ids, self.position_ids, self.attention_mask))
    error = roles.token_range_error(ids, pos, mask, vocab_size)
    if error:
      raise RequestError(error)


@struct.dataclass
class TemplateKV:
  """Device copy of the template's per-layer K/V: keys[l], values[l] [t, K, H] (t may be 0)."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]

  @classmethod
  def from_template(cls, template: Template | None, model: MSAForCausalLM, dtype=jnp.float32):
    cfg = model.cfg
    if template is None:
      empty = jnp.zeros((0, cfg.num_kv_heads, cfg.head_dim), dtype)
      return cls(keys=(empty,) * cfg.num_layers, values=(empty,) * cfg.num_layers)
    return cls(keys=tuple(jnp.asarray(template.keys[l], dtype) for l in range(cfg.num_layers)),
               values=tuple(jnp.asarray(template.values[l], dtype) for l in range(cfg.num_layers)))


@struct.dataclass
class LayerCache:
  """One layer's decode cache: keys, values [B, S, K, H], mask [B, S]; `length` slots used."""

  keys: jax.Array
  values: jax.Array
  mask: jax.Array
  length: jax.Array  # int32 scalar: index of the next free slot


@struct.dataclass
class DecodeState:
  """Everything stage 3 needs: per-layer caches, the next position per row, the last logits."""

  caches: tuple[LayerCache, ...]
  next_position: jax.Array  # [B] int32
  last_logits: jax.Array  # [B, V] float32


@struct.dataclass
class Routed:
  """A router layer's choice per request: bank rows and stable ids [B, k] (-1 padded), scores."""

  rows: jax.Array
  doc_ids: jax.Array
  scores: jax.Array  # [B, k], -inf where none
  doc_scores: jax.Array | None  # [B, M] per bank row (-inf for deleted rows), when asked for


@struct.dataclass
class PrefillOutput:
  logits: jax.Array  # [B, T, V]
  routed: dict[int, Routed]


def _route_layer(layer, h, q, k, query_mask, index: RoutingIndex, doc_ids,
                 with_doc_scores: bool) -> Routed:
  """Routing at one router layer: score every live chunk, pick the top-k bank rows."""
  cfg = layer.cfg
  rq, _ = layer.attn.routing_qk(h, q, k)
  if cfg.msa.routing_score.normalize:
    rq = norms.l2_normalize(rq)
  rows, scores, ds = index.route(rq, query_mask, layer.index, cfg,
                                 with_doc_scores=with_doc_scores)
  ids = jnp.where(rows >= 0, doc_ids[jnp.maximum(rows, 0)], -1)
  return Routed(rows=rows, doc_ids=ids, scores=scores, doc_scores=ds)


def _attend_layer(layer, x, q, k, v, valid, tk, tv, memory, max_new_tokens: int):
  """Attention over [template ; memory chunks (router layers) ; request] and the layer's cache.

  tk, tv [t, K, H]; memory: (keys, values [B, S, K, H], mask [B, S]) or None.
  """
  b, t = valid.shape
  parts_k = [jnp.broadcast_to(tk[None], (b,) + tk.shape).astype(k.dtype)]
  parts_v = [jnp.broadcast_to(tv[None], (b,) + tv.shape).astype(v.dtype)]
  parts_m = [jnp.ones((b, tk.shape[0]), bool)]
  if memory is not None:
    mk, mv, mm = memory
    parts_k.append(mk.astype(k.dtype))
    parts_v.append(mv.astype(v.dtype))
    parts_m.append(mm)
  prefix_m = jnp.concatenate(parts_m, axis=1)  # B S
  self_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, :, None] & valid[:, None, :]
  # Bottom-right aligned: every valid request token sees the whole prefix.
  mask = jnp.concatenate([prefix_m[:, None, :] & valid[:, :, None], self_mask], axis=2)
  keys = jnp.concatenate(parts_k + [k], axis=1)
  values = jnp.concatenate(parts_v + [v], axis=1)
  x = layer.post(x, attention.attend(q, keys, values, mask))
  room = [(0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
  cache = LayerCache(keys=jnp.pad(keys, room), values=jnp.pad(values, room),
                     mask=jnp.pad(jnp.concatenate([prefix_m, valid], axis=1),
                                  [(0, 0), (0, max_new_tokens)]),
                     length=jnp.asarray(keys.shape[1], jnp.int32))
  return x, cache


def _finish(model, x, request: Request, caches, routed) -> tuple[PrefillOutput, DecodeState]:
  logits = model.final_logits(x)
  valid = request.attention_mask.astype(bool)
  last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[1]), -1), axis=1)  # B: last valid token
  last_pos = jnp.take_along_axis(request.position_ids, last[:, None], axis=1)[:, 0]
  last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  return (PrefillOutput(logits=logits, routed=routed),
          DecodeState(caches=tuple(caches), next_position=last_pos + 1, last_logits=last_logits))


def route_and_prefill(graphdef: nnx.GraphDef, state: nnx.State, index: RoutingIndex,
                      content: ContentSource, doc_ids: jax.Array, template: TemplateKV,
                      request: Request, max_new_tokens: int, with_doc_scores: bool = False
                      ) -> tuple[PrefillOutput, DecodeState]:
  """Stage 2 as one pure function (jit it with the sizes static; see `prefill_jit`).

  The content of the selected documents is read inside jit through `content` (device arrays,
  or a host callback). doc_ids [M]: the stable id of each bank row, to report selections by id.
  """
  model: MSAForCausalLM = nnx.merge(graphdef, state)
  valid = request.attention_mask.astype(bool)
  query_mask = valid & (request.doc_ids == roles.QUERY)
  x = model.embed(request.input_ids)
  caches, routed = [], {}
  for i, layer in enumerate(model.layers):
    h, q, k, v = layer.pre(x, request.position_ids)
    memory = None
    if layer.is_router:
      routed[i] = _route_layer(layer, h, q, k, query_mask, index, doc_ids, with_doc_scores)
      memory = content.gather(i, routed[i].rows, index)
    x, cache = _attend_layer(layer, x, q, k, v, valid, template.keys[i], template.values[i],
                             memory, max_new_tokens)
    caches.append(cache)
  return _finish(model, x, request, caches, routed)


prefill_jit = jax.jit(route_and_prefill, static_argnums=(0,),
                      static_argnames=("max_new_tokens", "with_doc_scores"))


# --- host-driven stage 2: route on device, page selected content in, continue ------------------

@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, input_ids):
  return nnx.merge(graphdef, state).embed(input_ids)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("with_doc_scores",))
def _pre_and_route(graphdef, state, x, request: Request, index: RoutingIndex, doc_ids,
                   with_doc_scores: bool):
  layer = nnx.merge(graphdef, state)
  h, q, k, v = layer.pre(x, request.position_ids)
  valid = request.attention_mask.astype(bool)
  routed = None
  if layer.is_router:
    routed = _route_layer(layer, h, q, k, valid & (request.doc_ids == roles.QUERY), index, doc_ids,
                          with_doc_scores)
  return (q, k, v), routed


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
def _attend(graphdef, state, x, qkv, valid, tk, tv, memory, max_new_tokens):
  return _attend_layer(nnx.merge(graphdef, state), x, *qkv, valid, tk, tv, memory, max_new_tokens)


@functools.partial(jax.jit, static_argnums=(0,))
def _finish_jit(graphdef, state, x, request, caches, routed):
  return _finish(nnx.merge(graphdef, state), x, request, caches, routed)


def route_and_prefill_paged(model: MSAForCausalLM, index: RoutingIndex, pages, doc_ids: jax.Array,
                            template: TemplateKV, request: Request, max_new_tokens: int,
                            with_doc_scores: bool = False) -> tuple[PrefillOutput, DecodeState]:
  """Stage 2 driven from the host: identical results to `route_and_prefill`.

  At each router layer the selection comes back to the host (one small explicit transfer), the
  `PageCache` moves only the missing documents' blocks to the device, and the layer continues
  on device. Layers are jitted one at a time (one compile per distinct layer structure).
  """
  graphdef, state = nnx.split(model)
  parts = [nnx.split(layer) for layer in model.layers]
  valid = request.attention_mask.astype(bool)
  x = _embed(graphdef, state, request.input_ids)
  caches, routed = [], {}
  for i, (g, s) in enumerate(parts):
    qkv, r = _pre_and_route(g, s, x, request, index, doc_ids, with_doc_scores=with_doc_scores)
    memory = None
    if r is not None:
      routed[i] = r
      memory = pages.fetch(i, jax.device_get(r.rows))
    x, cache = _attend(g, s, x, qkv, valid, template.keys[i], template.values[i], memory,
                       max_new_tokens=max_new_tokens)
    caches.append(cache)
  return _finish_jit(graphdef, state, x, request, caches, routed)
