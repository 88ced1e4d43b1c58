"""The MSA model: a Qwen3 decoder whose router layers attend to routed, chunk-pooled documents.

The modules own parameters; what a token may see and which documents are routed is decided by
`msa_jax.math` functions called from `Block.__call__`. One forward covers the training path of
SPEC §4: documents and active tokens packed in one sequence.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx, struct

from msa_jax.config import ModelConfig
from msa_jax.math import attention, masks, norms, pooling, roles, rope, routing
from msa_jax.nn.layers import MLP, Buffer, Embed, Linear, RMSNorm


@struct.dataclass
class Sequence:
  """What every layer needs to know about the packed sequence [B, T] (built once per forward)."""

  positions: jax.Array  # B T int32
  doc_ids: jax.Array  # B T int32
  valid: jax.Array  # B T bool
  token_mask: jax.Array  # B T T bool
  chunks: pooling.PackedChunks  # C chunk slots per row
  num_doc_slots: int = struct.field(pytree_node=False)  # M+1: document ids 0..M

  @property
  def query_mask(self) -> jax.Array:
    """Routing tokens: role 0 and not padding."""
    return self.valid & (self.doc_ids == roles.QUERY)


@struct.dataclass
class Routing:
  """One router layer's routing of each sample."""

  doc_scores: jax.Array  # B M+1 float32, -inf = absent / id 0
  selected: jax.Array  # B k int32 document ids, descending score, -1 padded


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, router: bool, rngs: nnx.Rngs):
    d, n, kh, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, n * h, rngs=rngs)
    self.k_proj = Linear(d, kh * h, rngs=rngs)
    self.v_proj = Linear(d, kh * h, rngs=rngs)
    self.o_proj = Linear(n * h, d, rngs=rngs)
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps)
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps)
    if router and cfg.msa.decouple_router:
      self.router_q_proj = Linear(d, n * h, rngs=rngs)
      self.router_k_proj = Linear(d, kh * h, rngs=rngs)
    self.cfg = cfg

  def qkv(self, h: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h [B, T, D] (normed input) -> q [B, T, N, H], k, v [B, T, K, H]; q/k normed and rotated."""
    c = self.cfg
    b, t, _ = h.shape
    q = self.q_norm(self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim))
    k = self.k_norm(self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim))
    v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = rope.apply_rope(q, positions, theta=c.rope_theta)
    k = rope.apply_rope(k, positions, theta=c.rope_theta)
    return q, k, v

  def routing_qk(self, h: jax.Array, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token routing queries [B, T, N, H] and routing keys [B, T, K, H] (before pooling).

    Decoupled: the router projections of h (no norm, no RoPE). Otherwise the attention q and k.
    """
    c = self.cfg
    if not c.msa.decouple_router:
      return q, k
    b, t, _ = h.shape
    rq = self.router_q_proj(h).reshape(b, t, c.num_heads, c.head_dim)
    rk = self.router_k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
    return rq, rk


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = Attention(cfg, router=cfg.is_router_layer(layer), rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.cfg = cfg
    self.index = layer
    self.is_router = cfg.is_router_layer(layer)

  def pre(self, x: jax.Array, positions: jax.Array):
    """x [B, T, D] -> (h, q, k, v): the normed input and the rotated attention projections."""
    h = self.input_norm(x)
    return (h, *self.attn.qkv(h, positions))

  def post(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
    """Residual adds around o_proj(attn_out [B, T, N, H]) and the MLP."""
    b, t = x.shape[:2]
    x = x + self.attn.o_proj(attn_out.reshape(b, t, -1))
    return x + self.mlp(self.post_attn_norm(x))

  def __call__(self, x: jax.Array, seq: Sequence) -> tuple[jax.Array, Routing | None]:
    """The training path: documents and active tokens packed in one sequence (SPEC §4)."""
    h, q, k, v = self.pre(x, seq.positions)
    keys, values, mask, routed = k, v, seq.token_mask, None
    if self.is_router:
      routed, (mem_k, mem_v, mem_mask) = self._memory(h, q, k, v, seq)
      keys = jnp.concatenate([mem_k, k], axis=1)
      values = jnp.concatenate([mem_v, v], axis=1)
      mask = jnp.concatenate([mem_mask, mask], axis=2)
    return self.post(x, attention.attend(q, keys, values, mask)), routed

  def _memory(self, h, q, k, v, seq: Sequence):
    """Pooled K/V of every chunk, routing, and the mask that admits the selected chunks."""
    m = self.cfg.msa
    pooled_k = pooling.segment_chunk_mean(k, seq.chunks).astype(k.dtype)  # B C K H
    pooled_v = pooling.segment_chunk_mean(v, seq.chunks).astype(v.dtype)
    rq, rk = self.attn.routing_qk(h, q, k)
    rk = pooled_k if not m.decouple_router else pooling.segment_chunk_mean(rk, seq.chunks)
    if m.routing_score.normalize:
      rq, rk = norms.l2_normalize(rq), norms.l2_normalize(rk)
    doc_scores, selected = routing.route(
        rq, seq.query_mask, rk, seq.chunks.chunk_valid, seq.chunks.chunk_doc,
        num_docs=seq.num_doc_slots, k=m.top_k_docs, scale=m.routing_score.scale(self.cfg.head_dim),
        head_reduce=m.head_reduce, query_reduce=m.query_reduce, chunk_reduce=m.chunk_reduce)
    chosen = routing.selected_chunk_mask(seq.chunks.chunk_doc, selected)
    mem_mask = masks.memory_mask(seq.doc_ids, seq.valid, seq.chunks.chunk_start, chosen)
    return Routing(doc_scores, selected), (pooled_k, pooled_v, mem_mask)


class MSAForCausalLM(nnx.Module):
  """Qwen3 backbone + MSA router layers. Parameters mirror the official checkpoint one to one."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs)
    self.temperature = Buffer(jnp.asarray(cfg.msa.aux_temperature, jnp.float32))
    self.cfg = cfg

  def __call__(self, input_ids: jax.Array, seq: Sequence) -> tuple[jax.Array, dict[int, Routing]]:
    """input_ids [B, T] -> logits [B, T, V] (float32) and the routing of every router layer."""
    x = self.embed(input_ids)
    routed = {}
    for i, layer in enumerate(self.layers):
      x, r = layer(x, seq)
      if r is not None:
        routed[i] = r
    return self.final_logits(x), routed

  def final_logits(self, x: jax.Array) -> jax.Array:
    """Final RMSNorm, then lm_head (or the tied embedding): [..., D] -> [..., V] float32."""
    x = self.final_norm(x)
    if self.cfg.tie_word_embeddings:
      return self.embed.attend(x).astype(jnp.float32)
    return jnp.dot(x, self.lm_head.kernel[...], preferred_element_type=jnp.float32)


def build_sequence(doc_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array, *,
                   pooling_size: int, max_chunks: int, num_doc_slots: int) -> Sequence:
  """The per-forward `Sequence` of a packed batch (all shapes static)."""
  valid = attention_mask.astype(bool)
  doc_ids = doc_ids.astype(jnp.int32)
  return Sequence(
      positions=position_ids.astype(jnp.int32),
      doc_ids=doc_ids,
      valid=valid,
      token_mask=masks.token_mask(doc_ids, valid),
      chunks=pooling.PackedChunks.from_doc_ids(doc_ids, valid, pooling_size, max_chunks),
      num_doc_slots=num_doc_slots,
  )


def from_params(cfg: ModelConfig, params) -> MSAForCausalLM:
  """A model whose variables are the plain nested dict `params` (e.g. from a checkpoint)."""
  model = nnx.eval_shape(lambda: MSAForCausalLM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def weights_fingerprint(model: MSAForCausalLM) -> str:
  """sha256 of the model's variables as float32 (so a bfloat16 checkpoint and its float32 cast
  agree), over their paths in sorted order: what a bank records of the weights that encoded it."""
  import hashlib

  import numpy as np

  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  sha = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(jax.device_get(leaf))
    a = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V" else a
    sha.update(f"{jax.tree_util.keystr(path)}{list(a.shape)}".encode())
    sha.update(np.ascontiguousarray(a).tobytes())
  return sha.hexdigest()
