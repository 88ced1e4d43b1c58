"""Device-side views of a bank: the routing index (always on device) and content K̄/V̄ sources.

The routing index holds every chunk's routing key per router layer — small, scanned on every
request. Content K̄/V̄ is large and only the selected documents' chunks are needed, so it is read
through a `ContentSource`:

- `DeviceContent`: the whole content on device (tests, small banks); gathered inside jit.
- `HostContent`: content in host memory or memory-mapped on disk; reached from inside jit by
  `jax.pure_callback`, which reads only the selected chunks.

Both give the same arrays: per router layer, the selected documents' chunks packed as
[B, k·Cmax, K, H] with a validity mask [B, k·Cmax] (documents in ascending bank order).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from msa_jax import ops
from msa_jax.math import routing
from msa_jax.memory.bank import MemoryBank


@struct.dataclass
class RoutingIndex:
  """routing_keys[l] [C, K, H]; chunk_row [C] bank row of each chunk; live [M] routable rows."""

  routing_keys: dict[int, jax.Array]
  chunk_row: jax.Array
  live: jax.Array
  doc_offset: jax.Array  # [M] first chunk of each row
  doc_count: jax.Array  # [M] chunks of each row
  max_chunks: int = struct.field(pytree_node=False)  # Cmax over rows

  @property
  def num_docs(self) -> int:
    return int(self.live.shape[0])

  def route(self, q: jax.Array, query_mask: jax.Array, layer: int, cfg, *,
            with_doc_scores: bool = False):
    """Scores every bank chunk of `layer` for each request (in tiles) and picks the top-k live
    rows (k = cfg.msa.top_k_docs).

    q [B, T, N, H] routing queries (normalised as the score needs). Returns (rows [B, k] -1
    padded, their scores [B, k], and with `with_doc_scores` the score of every bank row [B, M]
    (-inf for deleted rows) — a chunk -> row reduction over the whole bank, for inspection).
    """
    m = cfg.msa
    chunk_valid = self.live[self.chunk_row]
    cs = ops.bank_chunk_scores(q, query_mask, self.routing_keys[layer], chunk_valid,
                               scale=m.routing_score.scale(cfg.head_dim),
                               head_reduce=m.head_reduce, query_reduce=m.query_reduce)  # B C
    chunk_doc = self.chunk_row + 1  # document "ids" 1..M: 0 means none
    ids, scores = ops.bank_top_k_docs(cs, chunk_doc, self.num_docs + 1, m.top_k_docs,
                                      self.max_chunks, m.chunk_reduce)
    rows = jnp.where(ids > 0, ids - 1, -1)
    ds = None
    if with_doc_scores:
      ds = routing.doc_scores(cs, jnp.broadcast_to(chunk_doc[None], cs.shape), self.num_docs + 1,
                              m.chunk_reduce)[:, 1:]
    return rows, scores, ds

  @classmethod
  def from_bank(cls, bank: MemoryBank, device=None) -> "RoutingIndex":
    put = lambda a: jax.device_put(np.asarray(a), device)
    return cls(
        routing_keys={l: put(a) for l, a in bank.routing_keys.items()},
        chunk_row=put(bank.chunk_doc.astype(np.int32)),
        live=put(bank.live.astype(bool)),
        doc_offset=put(bank.chunk_offset.astype(np.int32)),
        doc_count=put(bank.chunk_count.astype(np.int32)),
        max_chunks=max(bank.max_chunks_per_doc, 1),
    )


def chunk_rows(offset: jax.Array, count: jax.Array, selected: jax.Array, max_chunks: int
               ) -> tuple[jax.Array, jax.Array]:
  """Chunk indices [B, k·Cmax] of the selected rows [B, k] (-1 = none) and their validity mask."""
  j = jnp.arange(max_chunks)
  safe = jnp.maximum(selected, 0)
  rows = offset[safe][..., None] + j  # B k Cmax
  valid = (selected[..., None] >= 0) & (j < count[safe][..., None])
  b = selected.shape[0]
  return jnp.where(valid, rows, 0).reshape(b, -1), valid.reshape(b, -1)


def sort_selected(selected: jax.Array) -> jax.Array:
  """Selected rows [B, k] in ascending bank order, -1 (none) last."""
  big = jnp.iinfo(jnp.int32).max
  s = jnp.sort(jnp.where(selected >= 0, selected, big), axis=-1)
  return jnp.where(s == big, -1, s)


class ContentSource(Protocol):
  def gather(self, layer: int, selected: jax.Array, index: RoutingIndex
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Traced inside jit: selected rows [B, k] -> keys, values [B, k·Cmax, K, H], mask."""


@struct.dataclass
class DeviceContent:
  """Content K̄/V̄ resident on device: keys[l], values[l] [C, K, H]."""

  keys: dict[int, jax.Array]
  values: dict[int, jax.Array]

  @classmethod
  def from_bank(cls, bank: MemoryBank, device=None) -> "DeviceContent":
    put = lambda a: jax.device_put(np.asarray(a), device)
    return cls(keys={l: put(a) for l, a in bank.keys.items()},
               values={l: put(a) for l, a in bank.values.items()})

  def gather(self, layer, selected, index):
    sel = sort_selected(selected)
    k, valid = ops.gather_doc_chunks(self.keys[layer], index.doc_offset, index.doc_count, sel,
                                     max_chunks=index.max_chunks)
    v, _ = ops.gather_doc_chunks(self.values[layer], index.doc_offset, index.doc_count, sel,
                                 max_chunks=index.max_chunks)
    return k, v, valid


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class HostContent:
  """Content K̄/V̄ in host memory or memory-mapped files, read by a host callback.

  Only the selected documents' chunks cross to the device; `bytes_moved` counts them. A static
  pytree (hashed by identity), so it passes through jit as compile-time data.
  """

  bank: MemoryBank
  counter: dict = dataclasses.field(default_factory=lambda: {"bytes": 0, "calls": 0})

  @property
  def bytes_moved(self) -> int:
    return self.counter["bytes"]

  def _read(self, layer: int, rows: np.ndarray, valid: np.ndarray):
    keys, values = self.bank.keys[layer], self.bank.values[layer]
    flat = np.asarray(rows).reshape(-1)
    ok = np.asarray(valid).reshape(-1)
    k = np.zeros((flat.size,) + keys.shape[1:], keys.dtype)
    v = np.zeros_like(k)
    k[ok] = keys[flat[ok]]
    v[ok] = values[flat[ok]]
    self.counter["bytes"] += k[ok].nbytes + v[ok].nbytes
    self.counter["calls"] += 1
    shape = rows.shape + keys.shape[1:]
    return k.reshape(shape), v.reshape(shape)

  def gather(self, layer, selected, index):
    rows, valid = chunk_rows(index.doc_offset, index.doc_count, sort_selected(selected),
                             index.max_chunks)
    ref = self.bank.keys[layer]
    out = jax.ShapeDtypeStruct(rows.shape + ref.shape[1:], ref.dtype)
    k, v = jax.pure_callback(lambda r, m: self._read(layer, r, m), (out, out), rows, valid,
                             vmap_method="broadcast_all")
    return k, v, valid
