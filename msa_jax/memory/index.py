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
    rows, valid = chunk_rows(index.doc_offset, index.doc_count, sort_selected(selected),
                             index.max_chunks)
    k = jnp.take(self.keys[layer], rows, axis=0)
    v = jnp.take(self.values[layer], rows, axis=0)
    zero = jnp.zeros((), k.dtype)
    return (jnp.where(valid[..., None, None], k, zero), jnp.where(valid[..., None, None], v, zero),
            valid)


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
