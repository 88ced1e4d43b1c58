"""The training-path forward (SPEC §4) over a batch in the SPEC §13 format, with losses (SPEC §7).

`forward(graphdef, state, batch, shapes)` is a pure function: jit it once per `BatchShapes` (the
static sizes derived from a batch on the host) and reuse it. Padding is masks; nothing branches on
data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from msa_jax.config import ModelConfig
from msa_jax.math import losses, pooling, roles
from msa_jax.nn.model import MSAForCausalLM, Routing, build_sequence


class BatchError(ValueError):
  """A batch that violates the SPEC §13 conventions."""


# Official fixture names accepted as aliases of ours.
_ALIASES = {"batch_aux_labels": "aux_labels", "batch_answer_labels": "answer_labels"}
_REQUIRED = ("input_ids", "doc_ids", "attention_mask", "position_ids")
_OPTIONAL = ("labels", "aux_labels", "answer_labels", "train_qa_samples")


@struct.dataclass
class Batch:
  """A packed batch: documents and active tokens in one sequence per row (SPEC §13).

  input_ids, doc_ids, attention_mask, position_ids: [B, T] int.
  labels: [B, T] next-token targets (-100 = ignore); optional.
  aux_labels: [B, Mmax] multi-hot over each row's documents in ascending id, -1 padded (a -1 on a
  present document leaves it out of the contrast, `aux_loss`); optional.
  answer_labels: [B, T] and train_qa_samples [B]: the answer loss rows; optional.
  """

  input_ids: jax.Array
  doc_ids: jax.Array
  attention_mask: jax.Array
  position_ids: jax.Array
  labels: jax.Array | None = None
  aux_labels: jax.Array | None = None
  answer_labels: jax.Array | None = None
  train_qa_samples: jax.Array | None = None

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray], vocab_size: int | None = None
                  ) -> "Batch":
    """Validates numpy arrays (e.g. an `.npz`) and builds a batch. Raises `BatchError`.

    Token ids must lie in [0, vocab_size) and labels be -100 or in it (only signs are checked
    without a vocab_size); positions >= 0 on valid tokens. Padding may hold any id."""
    a = {_ALIASES.get(k, k): np.asarray(v) for k, v in arrays.items()
         if _ALIASES.get(k, k) in _REQUIRED + _OPTIONAL}
    missing = [k for k in _REQUIRED if k not in a]
    if missing:
      raise BatchError(f"batch lacks required arrays {missing}")
    shape = a["input_ids"].shape
    if len(shape) != 2 or shape[1] < 1:
      raise BatchError(f"input_ids must be [B, T] with T >= 1, got shape {shape}")
    for k in ("doc_ids", "attention_mask", "position_ids", "labels", "answer_labels"):
      if k in a and a[k].shape != shape:
        raise BatchError(f"{k} has shape {a[k].shape}, expected {shape} like input_ids")
    for k, v in a.items():
      if not (np.issubdtype(v.dtype, np.integer) or v.dtype == bool):
        raise BatchError(f"{k} must be an integer array, got dtype {v.dtype}")
    if "aux_labels" in a and (a["aux_labels"].ndim != 2 or a["aux_labels"].shape[0] != shape[0]):
      raise BatchError(f"aux_labels must be [B, max docs], got shape {a['aux_labels'].shape}")
    if ("answer_labels" in a) != ("train_qa_samples" in a):
      raise BatchError("answer_labels and train_qa_samples come together")
    if "train_qa_samples" in a and a["train_qa_samples"].shape != shape[:1]:
      raise BatchError(f"train_qa_samples must be [B], got {a['train_qa_samples'].shape}")
    valid = a["attention_mask"].astype(bool)
    _check_documents(a["doc_ids"], valid)
    # The model embeds padding too (a pad id outside the vocabulary is NaN and reaches valid
    # tokens through attention), so padding becomes token 0.
    a["input_ids"] = np.where(valid, a["input_ids"], 0)
    error = roles.token_range_error(a["input_ids"], a["position_ids"], valid, vocab_size)
    if error:
      raise BatchError(error)
    high = np.iinfo(np.int64).max if vocab_size is None else vocab_size
    vocab = "the vocabulary" + (f" [0, {vocab_size})" if vocab_size is not None else "")
    for k in ("labels", "answer_labels"):
      if k not in a:
        continue
      bad = (a[k] != losses.IGNORE_INDEX) & ((a[k] < 0) | (a[k] >= high))
      if bad.any():
        r, c = np.argwhere(bad)[0]
        raise BatchError(f"{k}[{r}, {c}] = {a[k][r, c]} is neither {losses.IGNORE_INDEX} "
                         f"(ignored) nor in {vocab}")
    return cls(**{k: jnp.asarray(v.astype(np.int32)) for k, v in a.items()})


def _check_documents(doc_ids: np.ndarray, valid: np.ndarray) -> None:
  """Each row's documents are contiguous runs with ids 1, 2, ..., n in sequence order."""
  if np.any(valid & (doc_ids < roles.TEMPLATE)):
    bad = sorted(set(doc_ids[valid & (doc_ids < roles.TEMPLATE)].tolist()))
    raise BatchError(f"doc_ids {bad} are not roles (valid roles: >=1 document, 0, -1, -2)")
  for b in range(doc_ids.shape[0]):
    ids = doc_ids[b][valid[b] & (doc_ids[b] >= roles.FIRST_DOC)]
    runs = ids[np.r_[True, ids[1:] != ids[:-1]]] if ids.size else ids
    want = np.arange(1, runs.size + 1)
    if runs.size and not np.array_equal(runs, want):
      raise BatchError(
          f"row {b}: document ids must be contiguous runs numbered 1..n in sequence order, "
          f"got runs {runs.tolist()}")
    # A run split by non-document tokens reads as one run above; check positions too.
    idx = np.flatnonzero(valid[b] & (doc_ids[b] >= roles.FIRST_DOC))
    for d in np.unique(ids):
      where = idx[ids == d]
      if where[-1] - where[0] + 1 != where.size:
        raise BatchError(f"row {b}: document {d} is not contiguous in the sequence")


@dataclasses.dataclass(frozen=True)
class BatchShapes:
  """The static sizes one compiled forward serves."""

  max_chunks: int  # chunk slots per row (>= the real chunk count of every row)
  num_doc_slots: int  # max document id + 1

  @classmethod
  def of(cls, batch: Batch, pooling_size: int, *, chunk_multiple: int = 8) -> "BatchShapes":
    """Sizes for `batch`, with the chunk count rounded up so that similar batches share a compile."""
    doc_ids = np.asarray(batch.doc_ids)
    valid = np.asarray(batch.attention_mask).astype(bool)
    counts, max_doc = [0], 0
    for row, v in zip(doc_ids, valid):
      ids = row[v & (row >= roles.FIRST_DOC)]
      if ids.size:
        _, lengths = np.unique(ids, return_counts=True)
        counts.append(int(sum(pooling.num_chunks(int(n), pooling_size) for n in lengths)))
        max_doc = max(max_doc, int(ids.max()))
    c = max(counts)
    return cls(max_chunks=max(chunk_multiple, -(-c // chunk_multiple) * chunk_multiple),
               num_doc_slots=max_doc + 1)


@struct.dataclass
class Losses:
  loss: jax.Array
  lm_loss: jax.Array
  aux_loss: jax.Array
  answer_loss: jax.Array
  reconstruction_loss: jax.Array


@struct.dataclass
class ForwardOutput:
  """logits [B, T, V]; per router layer l: doc_scores[l] [B, M+1], selected[l] [B, k]."""

  logits: jax.Array
  doc_scores: dict[int, jax.Array]
  selected: dict[int, jax.Array]
  losses: Losses | None = None


def aux_loss(cfg: ModelConfig, routed: Mapping[int, Routing], aux_labels: jax.Array,
             temperature: jax.Array) -> jax.Array:
  """InfoNCE averaged over (aux layer, sample with documents).

  aux_labels [B, Mmax]: column j is document id j+1 (ids are 1..n per row, checked on the host);
  1 positive, 0 negative, -1 left out of the contrast (padding, or a document the context already
  holds: at a second retrieval round the first round's document, pasted into the query, matches
  itself best, and the engine does not name it again).
  """
  total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  for l in cfg.aux_loss_layers:
    scores = routed[l].doc_scores  # B M+1
    width = min(aux_labels.shape[1], scores.shape[1] - 1)
    left_out = jnp.zeros(scores.shape, bool).at[:, 1:width + 1].set(aux_labels[:, :width] < 0)
    scores = jnp.where(left_out, -jnp.inf, scores)
    y = jnp.zeros(scores.shape, bool).at[:, 1:width + 1].set(aux_labels[:, :width] > 0)
    per_sample, has_docs = losses.infonce_loss(scores, y, temperature)
    total += jnp.sum(jnp.where(has_docs, per_sample, 0.0))
    count += jnp.sum(has_docs)
  return total / jnp.maximum(count, 1.0)


def compute_losses(cfg: ModelConfig, logits: jax.Array, routed: Mapping[int, Routing],
                   batch: Batch, temperature: jax.Array) -> Losses:
  """Total = w_lm·LM + w_aux·aux + w_ans·answer (SPEC §7). Parts that have no labels are 0."""
  m = cfg.msa
  if m.reconstruction_weight:
    raise NotImplementedError(
        "the reconstruction loss is not implemented; set recloss_weight to 0 to train")
  zero = jnp.zeros((), jnp.float32)
  lm = losses.lm_loss(logits, batch.labels) if batch.labels is not None else zero
  aux = aux_loss(cfg, routed, batch.aux_labels, temperature) if batch.aux_labels is not None else zero
  ans = zero
  if batch.answer_labels is not None:
    ans = losses.lm_loss(logits, batch.answer_labels, rows=batch.train_qa_samples > 0)
  total = m.lm_weight * lm + m.aux_weight * aux + m.answer_weight * ans
  return Losses(loss=total, lm_loss=lm, aux_loss=aux, answer_loss=ans, reconstruction_loss=zero)


def forward(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, shapes: BatchShapes, *,
            with_losses: bool = True) -> ForwardOutput:
  """Pure training-path forward: logits, routing of every router layer and (given labels) losses."""
  model: MSAForCausalLM = nnx.merge(graphdef, state)
  cfg = model.cfg
  seq = build_sequence(batch.doc_ids, batch.attention_mask, batch.position_ids,
                       pooling_size=cfg.msa.pooling_size, max_chunks=shapes.max_chunks,
                       num_doc_slots=shapes.num_doc_slots)
  logits, routed = model(batch.input_ids, seq)
  has_labels = any(x is not None for x in (batch.labels, batch.aux_labels, batch.answer_labels))
  out_losses = compute_losses(cfg, logits, routed, batch, model.temperature[...]) if with_losses and has_labels else None
  return ForwardOutput(
      logits=logits,
      doc_scores={l: r.doc_scores for l, r in routed.items()},
      selected={l: r.selected for l, r in routed.items()},
      losses=out_losses,
  )


forward_jit = jax.jit(forward, static_argnums=(0, 3), static_argnames=("with_losses",))


def run(model: MSAForCausalLM, batch: Batch, *, with_losses: bool = True) -> ForwardOutput:
  """Convenience: split the model, size the batch, and run the jitted forward."""
  graphdef, state = nnx.split(model)
  shapes = BatchShapes.of(batch, model.cfg.msa.pooling_size)
  return forward_jit(graphdef, state, batch, shapes, with_losses=with_losses)
