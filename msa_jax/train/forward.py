"""The training path in block layout: each sample's documents as a [M, L] block plus its active tokens.

`forward.forward` takes the packed layout of SPEC §13, where every token attends over the whole
row under a [T, T] mask. Training batches always have the shape `[documents ; active tokens]`, so
this module computes the same function (SPEC §4, tested equal to the packed forward) at a fraction
of the cost: documents attend within their own [L, L] block, and only the active tokens attend
over `[selected chunks ; active tokens]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from msa_jax import forward as packed
from msa_jax.engine.encode import pool_documents
from msa_jax.math import attention, losses, norms, pooling, roles, routing
from msa_jax.nn.model import MSAForCausalLM, Routing


@struct.dataclass
class MemoryBatch:
  """Training samples in block layout.

  doc_tokens [Bd, M, L] int (L a multiple of P; padding ignored), doc_lengths [Bd, M] (0 = no
  document in this slot). Document slot j is document id j+1 of its row. Bd is B, or 1 for a
  memory shared by every row (each document is encoded once; every row routes over all of them).
  input_ids, roles, positions, mask [B, A]: the active tokens (roles 0 / -1 / -2), which come
  after all documents; mask 0 = padding.
  labels [B, A]: HF-style targets (labels[t] is predicted at t-1; -100 = ignore).
  aux_labels [B, M]: 1 positive, 0 negative, -1 left out of the contrast (an empty slot, or a
  document the row's context already holds; `forward.aux_loss`).
  answer_labels [B, A]: labels of the answer sentence only (SPEC §7's answer loss); optional.
  doc_labels [Bd, M, L]: HF-style labels of document tokens (a language-model loss on documents,
  e.g. on each document's closing `[id]`); optional.
  """

  doc_tokens: jax.Array
  doc_lengths: jax.Array
  input_ids: jax.Array
  roles: jax.Array
  positions: jax.Array
  mask: jax.Array
  labels: jax.Array
  aux_labels: jax.Array
  answer_labels: jax.Array | None = None
  doc_labels: jax.Array | None = None

  @classmethod
  def from_arrays(cls, arrays) -> "MemoryBatch":
    a = {f: np.asarray(arrays[f]) for f in cls.__dataclass_fields__ if f in arrays}
    missing = [f for f in cls.__dataclass_fields__
               if f not in a and f not in ("answer_labels", "doc_labels")]
    if missing:
      raise packed.BatchError(f"memory batch lacks arrays {missing}")
    bd, m, length = a["doc_tokens"].shape
    shape = a["input_ids"].shape
    if bd not in (1, shape[0]) or a["doc_lengths"].shape != (bd, m):
      raise packed.BatchError(f"doc_tokens/doc_lengths must be [B or 1, M], got "
                              f"{a['doc_tokens'].shape} and {a['doc_lengths'].shape} for B={shape[0]}")
    if a["aux_labels"].shape != (shape[0], m):
      raise packed.BatchError(f"aux_labels must be [B, M] = {(shape[0], m)}")
    for n in ("roles", "positions", "mask", "labels", "answer_labels"):
      if n in a and a[n].shape != shape:
        raise packed.BatchError(f"{n} has shape {a[n].shape}, expected {shape}")
    if "doc_labels" in a and a["doc_labels"].shape != a["doc_tokens"].shape:
      raise packed.BatchError(f"doc_labels must be shaped like doc_tokens {a['doc_tokens'].shape}")
    if np.any(a["doc_lengths"] > length) or np.any(a["doc_lengths"] < 0):
      raise packed.BatchError(f"doc_lengths must lie in 0..{length}")
    if np.any((a["mask"] > 0) & (a["roles"] >= roles.FIRST_DOC)):
      raise packed.BatchError("active tokens must have roles 0, -1 or -2")
    return cls(**{k: jnp.asarray(v, jnp.int32) for k, v in a.items()})

  def to_packed(self) -> packed.Batch:
    """The same samples in the packed SPEC §13 layout (documents, then active tokens, right padded)."""
    a = jax.device_get(self)
    b = a.input_ids.shape[0]
    a = a.replace(doc_tokens=np.broadcast_to(a.doc_tokens, (b,) + a.doc_tokens.shape[1:]),
                  doc_lengths=np.broadcast_to(a.doc_lengths, (b,) + a.doc_lengths.shape[1:]))
    rows = []
    for r in range(a.input_ids.shape[0]):
      ids, role, pos, lab = [], [], [], []
      n_docs = 0
      for j, n in enumerate(a.doc_lengths[r]):
        if n:
          n_docs += 1
          ids += list(a.doc_tokens[r, j, :n]); role += [n_docs] * n; pos += list(range(n))
          lab += [losses.IGNORE_INDEX] * n
      keep = a.mask[r] > 0
      ids += list(a.input_ids[r][keep]); role += list(a.roles[r][keep])
      pos += list(a.positions[r][keep]); lab += list(a.labels[r][keep])
      rows.append((ids, role, pos, lab))
    t = max(len(x[0]) for x in rows)
    out = {n: np.zeros((len(rows), t), np.int64)
           for n in ("input_ids", "doc_ids", "attention_mask", "position_ids")}
    out["labels"] = np.full((len(rows), t), losses.IGNORE_INDEX, np.int64)
    for r, (ids, role, pos, lab) in enumerate(rows):
      n = len(ids)
      out["input_ids"][r, :n], out["doc_ids"][r, :n] = ids, role
      out["position_ids"][r, :n], out["labels"][r, :n] = pos, lab
      out["attention_mask"][r, :n] = 1
    present = a.doc_lengths > 0
    aux = np.where(present, a.aux_labels, -1)
    # Present slots are renumbered 1..n in order; empty slots only ever trail in our batches.
    out["aux_labels"] = np.stack([np.r_[row[p], np.full((~p).sum(), -1)] for row, p in zip(aux, present)])
    return packed.Batch.from_arrays(out)


def _merge(graphdef, state) -> MSAForCausalLM:
  """`state` is one nnx.State or a tuple of them (e.g. trainable params and the rest)."""
  return nnx.merge(graphdef, *(state if isinstance(state, tuple) else (state,)))


def memory_forward(graphdef: nnx.GraphDef, state, batch: MemoryBatch, *, doc_logits: bool = False,
                   route_softness=0.0):
  """Logits [B, A, V] of the active tokens and the routing (doc_scores [B, M+1]) of each router layer.

  doc_logits: also return the documents' logits [Bd, M, L, V] (all layers run on documents).
  route_softness: > 0 smooths routing's max reductions (`routing.smooth_max`; training only).
  """
  model = _merge(graphdef, state)
  cfg = model.cfg
  m = cfg.msa
  bd, num_docs, length = batch.doc_tokens.shape
  b = batch.input_ids.shape[0]
  pooled = pool_documents(model, batch.doc_tokens.reshape(bd * num_docs, length),
                          batch.doc_lengths.reshape(-1), all_layers=doc_logits)
  if doc_logits:
    pooled, doc_x = pooled
  c = pooling.num_chunks(length, m.pooling_size)
  chunk_valid = (jnp.arange(c)[None, None, :] * m.pooling_size
                 < batch.doc_lengths[:, :, None]).reshape(bd, num_docs * c)
  chunk_valid = jnp.broadcast_to(chunk_valid, (b, num_docs * c))
  chunk_doc = jnp.broadcast_to(jnp.arange(1, num_docs + 1)[None, :, None],
                               (b, num_docs, c)).reshape(b, num_docs * c)

  valid = batch.mask.astype(bool)
  query_mask = valid & (batch.roles == roles.QUERY)
  t = valid.shape[1]
  self_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, :, None] & valid[:, None, :]
  x = model.embed(batch.input_ids)
  routed = {}
  for i, layer in enumerate(model.layers):
    h, q, k, v = layer.pre(x, batch.positions)
    keys, values, mask = k, v, self_mask
    if layer.is_router:
      pk, pv, prk = (jnp.broadcast_to(p.reshape((bd, num_docs * c) + p.shape[2:]),
                                      (b, num_docs * c) + p.shape[2:]) for p in pooled[i])
      rq, _ = layer.attn.routing_qk(h, q, k)
      if m.routing_score.normalize:
        rq = norms.l2_normalize(rq)
      scores, selected = routing.route(
          rq, query_mask, prk, chunk_valid, chunk_doc, num_docs=num_docs + 1, k=m.top_k_docs,
          scale=m.routing_score.scale(cfg.head_dim), head_reduce=m.head_reduce,
          query_reduce=m.query_reduce, chunk_reduce=m.chunk_reduce, softness=route_softness)
      routed[i] = Routing(scores, selected)
      chosen = routing.selected_chunk_mask(chunk_doc, selected) & chunk_valid  # B C
      keys = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
      values = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
      mask = jnp.concatenate([chosen[:, None, :] & valid[:, :, None], self_mask], axis=2)
    x = layer.post(x, attention.attend(q, keys, values, mask))
  if doc_logits:
    return model.final_logits(x), routed, model.final_logits(doc_x).reshape(
        bd, num_docs, length, -1)
  return model.final_logits(x), routed


@struct.dataclass
class LossWeights:
  """Weights of the training loss terms; arrays so that a schedule can change them without a recompile.

  route_softness is the routing max reductions' smoothing τ (`routing.smooth_max`; 0 = exact, as
  at inference): not a weight, but a per-phase scalar of the loss that the step takes the same way.
  """

  lm: jax.Array
  aux: jax.Array
  answer: jax.Array
  doc: jax.Array
  route_softness: jax.Array

  @classmethod
  def of(cls, lm: float, aux: float, answer: float = 0.0, doc: float = 0.0,
         route_softness: float = 0.0) -> "LossWeights":
    return cls(*(jnp.asarray(w, jnp.float32) for w in (lm, aux, answer, doc, route_softness)))


@struct.dataclass
class Metrics:
  loss: jax.Array
  lm_loss: jax.Array
  aux_loss: jax.Array
  answer_loss: jax.Array
  doc_loss: jax.Array
  tokens: jax.Array  # labelled tokens in the batch
  recall: jax.Array  # fraction of positive documents selected, mean over router layers and rows
  top1: jax.Array  # rows whose best-scoring document is a positive one, mean over router layers
  token_accuracy: jax.Array  # argmax == label over labelled tokens
  exact: jax.Array  # rows whose every labelled token is predicted (teacher forced)


def loss_and_metrics(graphdef: nnx.GraphDef, state, batch: MemoryBatch,
                     weights: LossWeights) -> tuple[jax.Array, Metrics]:
  """Total = w_lm·LM + w_aux·InfoNCE + w_ans·answer (SPEC §7) + w_doc·document LM."""
  model = _merge(graphdef, state)
  zero = jnp.zeros((), jnp.float32)
  if batch.doc_labels is not None:
    logits, routed, doc_logits = memory_forward(graphdef, state, batch, doc_logits=True,
                                                route_softness=weights.route_softness)
    length = batch.doc_tokens.shape[-1]
    doc = losses.lm_loss(doc_logits.reshape((-1, length) + doc_logits.shape[-1:]),
                         batch.doc_labels.reshape(-1, length))
  else:
    logits, routed = memory_forward(graphdef, state, batch, route_softness=weights.route_softness)
    doc = zero
  total_lm, count = losses.shifted_cross_entropy(logits, batch.labels)
  lm = total_lm / jnp.maximum(count, 1.0)
  aux = packed.aux_loss(model.cfg, routed, batch.aux_labels, model.temperature[...])
  positive = batch.aux_labels > 0  # B M
  hits, firsts = [], []
  rows = jnp.any(positive, axis=1)
  for r in routed.values():
    chosen = jnp.any(jnp.arange(1, positive.shape[1] + 1)[None, :, None] == r.selected[:, None, :],
                     axis=-1)
    hits.append(jnp.sum(chosen & positive) / jnp.maximum(jnp.sum(positive), 1))
    # Recall@8 can be 1.0 while the best document is often not the gold one, which is what
    # answering from the router's best document needs (BUILD_NOTES.md).
    # The best document the row does not leave out (label -1: already in its context).
    sel = r.selected  # B k, ids 1.. (<= 0: none)
    slot = jnp.maximum(sel - 1, 0)
    usable = (sel > 0) & ~jnp.take_along_axis(batch.aux_labels < 0, slot, axis=1)
    first = jnp.argmax(usable, axis=1)[:, None]
    best = jnp.take_along_axis(jnp.take_along_axis(positive, slot, axis=1), first, axis=1)[:, 0]
    found = jnp.take_along_axis(usable, first, axis=1)[:, 0]
    firsts.append(jnp.sum(best & found & rows) / jnp.maximum(jnp.sum(rows), 1))
  recall = jnp.mean(jnp.stack(hits)) if hits else jnp.zeros(())
  top1 = jnp.mean(jnp.stack(firsts)) if firsts else jnp.zeros(())
  target = batch.labels[:, 1:]
  keep = target != losses.IGNORE_INDEX
  right = (jnp.argmax(logits[:, :-1], axis=-1) == target) | ~keep
  token_accuracy = jnp.sum(right & keep) / jnp.maximum(count, 1.0)
  has = jnp.any(keep, axis=1)
  exact = jnp.sum(jnp.all(right, axis=1) & has) / jnp.maximum(jnp.sum(has), 1)
  ans = losses.lm_loss(logits, batch.answer_labels) if batch.answer_labels is not None else zero
  loss = weights.lm * lm + weights.aux * aux + weights.answer * ans + weights.doc * doc
  return loss, Metrics(loss=loss, lm_loss=lm, aux_loss=aux, answer_loss=ans, doc_loss=doc,
                       tokens=count,
                       recall=recall, top1=top1,
                       token_accuracy=token_accuracy, exact=exact)
