"""Stage 1: encode documents (and an optional template prefix) into memory (SPEC §8.1).

Each document passes through the layers alone — document tokens only ever attend within their
own document (SPEC §4) — at positions 0..n-1. At every router layer its keys (after k_norm and
RoPE), values and routing keys are chunk-mean pooled. Layers above the last router layer are
never needed and are not run.

Documents are bucketed by length (bucket = next power of two, at least P) and batched to a token
budget, with short batches padded by empty rows, so jit compiles one shape per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msa_jax.math import attention, norms, pooling
from msa_jax.memory.bank import EncodedDocs, Template
from msa_jax.nn.model import MSAForCausalLM


class EncodeError(ValueError):
  """Documents that cannot be encoded (empty, too long, wrong dtype)."""


def _causal_valid_mask(lengths: jax.Array, length: int) -> jax.Array:
  """[b, L, L]: causal within each row's first `lengths[b]` tokens."""
  idx = jnp.arange(length)
  valid = idx[None, :] < lengths[:, None]  # b L
  causal = idx[None, :, None] >= idx[None, None, :]
  return causal & valid[:, :, None] & valid[:, None, :]


def pool_documents(model: MSAForCausalLM, tokens: jax.Array, lengths: jax.Array, *,
                   all_layers: bool = False):
  """tokens [b, L] (L a multiple of P), lengths [b] -> per router layer (K̄, V̄, K̄ᴿ) [b, C, K, H].

  Pure and differentiable: the encoder of stage 1 and of the block-layout training forward.
  Means are float32; K̄ᴿ is L2-normalised when the routing score is a cosine. Rows of length 0
  have no valid chunk. all_layers: run every layer (not only up to the last router layer) and
  return (pooled, final hidden states [b, L, D]), for a language-model loss on documents.
  """
  cfg = model.cfg
  m = cfg.msa
  b, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = _causal_valid_mask(lengths, length)
  x = model.embed(jnp.maximum(tokens, 0))
  out = {}
  last = max(m.router_layers)
  for i, layer in enumerate(model.layers):
    if i > last and not all_layers:
      break
    h, q, k, v = layer.pre(x, positions)
    if layer.is_router:
      pk, _ = pooling.chunk_mean(k, lengths, m.pooling_size)
      pv, _ = pooling.chunk_mean(v, lengths, m.pooling_size)
      _, rk = layer.attn.routing_qk(h, q, k)
      prk, _ = pooling.chunk_mean(rk, lengths, m.pooling_size)
      if m.routing_score.normalize:
        prk = norms.l2_normalize(prk)
      out[i] = (pk, pv, prk)
    if i < last or all_layers:
      x = layer.post(x, attention.attend(q, k, v, mask))
  return (out, x) if all_layers else out


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_batch(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                  lengths: jax.Array) -> dict[int, tuple[jax.Array, jax.Array, jax.Array]]:
  return pool_documents(nnx.merge(graphdef, state), tokens, lengths)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_template(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array):
  """tokens [t] -> per layer (k, v) [t, K, H]: causal self-attention at positions 0..t-1."""
  model: MSAForCausalLM = nnx.merge(graphdef, state)
  t = tokens.shape[0]
  positions = jnp.arange(t)[None]
  mask = _causal_valid_mask(jnp.array([t]), t)
  x = model.embed(tokens[None])
  out = {}
  for i, layer in enumerate(model.layers):
    _, q, k, v = layer.pre(x, positions)
    out[i] = (k[0], v[0])
    x = layer.post(x, attention.attend(q, k, v, mask))
  return out


def bucket_length(n: int, pooling_size: int) -> int:
  """Padded length for a document of n tokens: the next power of two, at least P, a multiple of P."""
  b = max(pooling_size, 1 << max(0, int(n - 1).bit_length()))
  return -(-b // pooling_size) * pooling_size


def _batches(lengths: np.ndarray, pooling_size: int, batch_tokens: int
             ) -> Iterator[tuple[int, np.ndarray, int]]:
  """(bucket length, document rows, rows per batch), longest buckets first."""
  buckets: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    buckets.setdefault(bucket_length(int(n), pooling_size), []).append(i)
  for length in sorted(buckets, reverse=True):
    rows = np.asarray(buckets[length])
    per_batch = max(1, batch_tokens // length)
    for s in range(0, rows.size, per_batch):
      yield length, rows[s:s + per_batch], per_batch


def check_documents(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> None:
  if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
    raise EncodeError(f"documents must be tokens [M, Lmax] with lengths [M]; got {tokens.shape} "
                      f"and {lengths.shape}")
  if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)):
    raise EncodeError(f"tokens and lengths must be integers, got {tokens.dtype}, {lengths.dtype}")
  empty = np.flatnonzero(lengths < 1)
  if empty.size:
    raise EncodeError(f"documents {empty[:10].tolist()} are empty (length < 1)")
  if np.any(lengths > tokens.shape[1]):
    raise EncodeError(f"a length exceeds the token array width {tokens.shape[1]}")
  live = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  bad = live & ((tokens < 0) | (tokens >= vocab_size))
  if bad.any():
    row = int(np.flatnonzero(bad.any(1))[0])
    raise EncodeError(f"document {row} has token ids outside 0..{vocab_size - 1}")


def encode_documents(model: MSAForCausalLM, tokens: np.ndarray, lengths: np.ndarray, *,
                     dtype=np.float32, batch_tokens: int = 8192,
                     progress: Callable[[int, int], None] | None = None,
                     mesh=None, axis: str | None = None) -> EncodedDocs:
  """Encodes documents (tokens [M, Lmax] padded with anything, lengths [M]) in document order.

  Returns per router layer K̄, V̄, K̄ᴿ with the chunks of all documents concatenated in order.
  `progress(done_docs, done_tokens)` is called after every batch. With a `mesh`, every batch is
  sharded over its `axis` (rows padded to a multiple of its size) and the weights replicated:
  data-parallel encoding, the same bank up to float rounding.
  """
  cfg = model.cfg
  m = cfg.msa
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  check_documents(tokens, lengths, cfg.vocab_size)
  if not m.router_layers:
    raise EncodeError("the model has no router layers: there is no memory to encode")
  graphdef, state = nnx.split(model)
  shards = 1
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    shards = mesh.shape[axis]
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    rows_sharding = NamedSharding(mesh, PartitionSpec(axis))
  counts = -(-lengths.astype(np.int64) // m.pooling_size)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  total = int(offsets[-1])
  shape = (total, cfg.num_kv_heads, cfg.head_dim)
  result = {l: tuple(np.empty(shape, dtype) for _ in range(3)) for l in m.router_layers}
  done_docs = done_tokens = 0
  for length, rows, per_batch in _batches(lengths, m.pooling_size, batch_tokens):
    per_batch = -(-per_batch // shards) * shards  # whole rows per device
    batch = np.zeros((per_batch, length), np.int32)
    blen = np.zeros((per_batch,), np.int32)
    for j, r in enumerate(rows):
      n = int(lengths[r])
      batch[j, :n] = tokens[r, :n]
      blen[j] = n
    if mesh is not None:
      batch, blen = jax.device_put((batch, blen), rows_sharding)
    pooled = jax.device_get(_encode_batch(graphdef, state, batch, blen))
    for l, arrays in pooled.items():
      for dest, src in zip(result[l], arrays):
        for j, r in enumerate(rows):
          dest[offsets[r]:offsets[r + 1]] = src[j, :counts[r]]
    done_docs += rows.size
    done_tokens += int(lengths[rows].sum())
    if progress is not None:
      progress(done_docs, done_tokens)
  return EncodedDocs(lengths=lengths.astype(np.int64),
                     keys={l: a[0] for l, a in result.items()},
                     values={l: a[1] for l, a in result.items()},
                     routing_keys={l: a[2] for l, a in result.items()})


def encode_template(model: MSAForCausalLM, tokens: np.ndarray, dtype=np.float32) -> Template:
  """The template prefix's K/V for every layer (positions 0..t-1).

  Raises `EncodeError` for tokens that are not integer ids in the model's vocabulary, before
  any compute (an id outside it would embed as NaN K/V and poison every later request).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size < 1:
    raise EncodeError(f"a template is a non-empty 1-D token array, got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise EncodeError(f"template tokens must be integers, got dtype {tokens.dtype}")
  vocab = model.cfg.vocab_size
  bad = np.flatnonzero((tokens < 0) | (tokens >= vocab))
  if bad.size:
    raise EncodeError(f"template[{bad[0]}] = {tokens[bad[0]]} is outside the vocabulary "
                      f"[0, {vocab})")
  graphdef, state = nnx.split(model)
  kv = jax.device_get(_encode_template(graphdef, state, tokens.astype(np.int32)))
  return Template(tokens=tokens.astype(np.int64),
                  keys={l: np.asarray(k, dtype) for l, (k, _) in kv.items()},
                  values={l: np.asarray(v, dtype) for l, (_, v) in kv.items()})


class Progress:
  """Progress line for long encodes: documents, tokens, tokens/s, ETA (at most every `every_s`)."""

  def __init__(self, total_docs: int, total_tokens: int, *, every_s: float = 5.0, out=None):
    import sys
    self.total_docs, self.total_tokens = total_docs, total_tokens
    self.start = self.last = time.perf_counter()
    self.every_s, self.out = every_s, out or sys.stderr

  def __call__(self, docs: int, tokens: int) -> None:
    now = time.perf_counter()
    if now - self.last < self.every_s and docs < self.total_docs:
      return
    self.last = now
    rate = tokens / max(now - self.start, 1e-9)
    eta = (self.total_tokens - tokens) / max(rate, 1e-9)
    print(f"encoded {docs}/{self.total_docs} documents, {tokens}/{self.total_tokens} tokens, "
          f"{rate:,.0f} tokens/s, ETA {eta:,.0f} s", file=self.out, flush=True)


def fingerprint(tokens: np.ndarray, lengths: np.ndarray, texts=None, titles=None) -> str:
  """sha256 of documents (tokens [M, Lmax] padded with anything, lengths [M]): of the lengths
  then every document's tokens, as little-endian int64, in order (padding does not count); then,
  when given, the JSON list of texts and of titles."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  sha = hashlib.sha256(b"msa-jax documents v1\0")
  sha.update(np.ascontiguousarray(lengths, "<i8").tobytes())
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  sha.update(np.ascontiguousarray(tokens[valid], "<i8").tobytes())
  for extra in (texts, titles):
    if extra is not None:
      sha.update(b"\0" + json.dumps(list(extra), ensure_ascii=False).encode())
  return sha.hexdigest()


@dataclasses.dataclass(frozen=True)
class Encoded:
  """What `encode_to_bank` did: the input's ids `first_id .. first_id + num_docs - 1`."""

  first_id: int
  num_docs: int
  resumed_from: int  # documents of this input that were already committed
  bank_docs: int     # live documents in the bank now


def encode_to_bank(model: MSAForCausalLM, tokens: np.ndarray, lengths: np.ndarray, path, *,
                   template: np.ndarray | None = None, dtype: str = "float32",
                   shard_docs: int = 1024, batch_tokens: int = 8192, append: bool = False,
                   texts=None, titles=None, doc_ids=None, input_sha256: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Encoded:
  """Encodes documents into the on-disk bank at `path`, one committed shard per `shard_docs`.

  Resumable: the bank remembers a fingerprint of each input it encoded (`fingerprint`) and how
  much of it is committed, so re-running the same encode after a kill continues where it stopped
  and ends with the same bank as an uninterrupted run, and re-running a finished one changes
  nothing (documents deleted since stay deleted). Document i gets id `first_id + i`: 0 in a new
  bank. A bank that holds other documents is refused unless `append`, which adds these documents
  under new ids (from the bank's `next_doc_id`; an append is resumable the same way).
  texts, titles: optional, one string per document, stored beside its K/V (`store.read_texts`);
  they are part of the input's fingerprint.
  doc_ids, input_sha256: for inputs that fix their ids themselves (e.g. text documents rendered
  with their id, `msa_jax.text_memory`): the ids [M] and the input's fingerprint, which must
  determine them (it replaces `fingerprint(tokens, ...)`).
  """
  import ml_dtypes

  from msa_jax.memory.bank import BankSpec
  from msa_jax.memory.store import BankWriter
  from msa_jax.nn.model import weights_fingerprint

  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  check_documents(tokens, lengths, model.cfg.vocab_size)
  if not len(lengths):
    raise EncodeError("no documents to encode (the input is empty)")
  if shard_docs < 1:
    raise EncodeError(f"shard_docs={shard_docs} must be >= 1")
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  spec = BankSpec.for_model(model.cfg, dtype)
  tpl = None if template is None else encode_template(model, template, np_dtype)
  for name, v in (("texts", texts), ("titles", titles)):
    if v is not None and len(v) != len(lengths):
      raise EncodeError(f"{name}: {len(v)} given for {len(lengths)} documents")
  if (doc_ids is None) != (input_sha256 is None):
    raise EncodeError("doc_ids and input_sha256 come together")
  if doc_ids is not None and len(doc_ids) != len(lengths):
    raise EncodeError(f"doc_ids: {len(doc_ids)} given for {len(lengths)} documents")
  sha = input_sha256 or fingerprint(tokens, lengths, texts, titles)
  with BankWriter(path, spec, template=tpl,
                  weights_sha256=weights_fingerprint(model)) as writer:
    record = writer.input_record(sha)
    if record is None:
      if writer.next_doc_id and not append:
        raise EncodeError(
            f"{path} holds documents encoded from another input ({writer.num_live_docs} live, "
            f"ids below {writer.next_doc_id}); an encode resumes only the documents it started "
            "with. To add these documents to the bank under new ids, encode them with --append "
            "(encode_to_bank(..., append=True)); to start over, use a new bank directory")
      record = writer.new_input(sha, len(lengths))
    start = record.committed
    base_tokens = int(lengths[:start].sum())
    for s in range(start, len(lengths), shard_docs):
      e = min(s + shard_docs, len(lengths))
      done = (lambda d, t, s=s: progress(s + d, base_tokens + t)) if progress else None
      enc = encode_documents(model, tokens[s:e], lengths[s:e], dtype=np_dtype,
                             batch_tokens=batch_tokens, progress=done)
      record = writer.append_input(enc, record,
                                   doc_ids=None if doc_ids is None else doc_ids[s:e],
                                   texts=None if texts is None else texts[s:e],
                                   titles=None if titles is None else titles[s:e])
      base_tokens += int(lengths[s:e].sum())
    return Encoded(first_id=record.first_id, num_docs=record.num_docs, resumed_from=start,
                   bank_docs=writer.num_live_docs)
