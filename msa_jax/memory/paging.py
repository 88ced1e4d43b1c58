"""A device-resident page cache over documents' K̄/V̄ blocks, filled from a host or disk store.

Each router layer has `slots` pages of [Cmax, K, H] keys and values on device. A page holds one
bank row's chunks (zero padded). `PageCache.fetch(layer, rows)` pages in the rows that are not
resident — one explicit `jax.device_put` of just those blocks, evicting the least recently used
pages that the current request does not need — and returns the selected chunks packed as
[B, k·Cmax, K, H] plus their mask, read from the pages on device. Repeated selections (interleave
rounds, popular documents, batched requests that share documents) transfer nothing.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.memory.bank import MemoryBank


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_pages(pages: jax.Array, slots: jax.Array, blocks: jax.Array) -> jax.Array:
  """pages [S, Cmax, K, H] with blocks [n, Cmax, K, H] written at slots [n] (in place)."""
  return pages.at[slots].set(blocks.astype(pages.dtype))


@jax.jit
def _read_pages(keys: jax.Array, values: jax.Array, slots: jax.Array, mask: jax.Array):
  """Selected pages [B, k] (-1 = none) -> keys, values [B, k·Cmax, K, H] (zeros where masked)."""
  b, k = slots.shape
  safe = jnp.maximum(slots, 0)
  sel_k = keys[safe].reshape((b, -1) + keys.shape[2:])
  sel_v = values[safe].reshape((b, -1) + values.shape[2:])
  m = mask[..., None, None]
  return jnp.where(m, sel_k, 0), jnp.where(m, sel_v, 0)


class PageCache:
  """LRU page cache of bank rows' K̄/V̄ on one device. Host-side bookkeeping, device-side data."""

  def __init__(self, bank: MemoryBank, slots: int, *, device=None):
    if slots < 1:
      raise ValueError(f"{slots=} must be >= 1")
    self.bank, self.slots, self.device = bank, slots, device
    self.max_chunks = max(bank.max_chunks_per_doc, 1)
    s = bank.spec
    shape = (slots, self.max_chunks, s.num_kv_heads, s.head_dim)
    dtype = next(iter(bank.keys.values())).dtype if bank.keys else np.float32
    zeros = np.zeros(shape, dtype)
    self.keys = {l: jax.device_put(zeros, device) for l in bank.keys}
    self.values = {l: jax.device_put(zeros, device) for l in bank.keys}
    self._lru = {l: collections.OrderedDict() for l in bank.keys}  # row -> slot, oldest first
    self.bytes_moved = 0
    self.hits = 0
    self.misses = 0

  def _block(self, layer: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    off, n = int(self.bank.chunk_offset[row]), int(self.bank.chunk_count[row])
    k = np.zeros(self.keys[layer].shape[1:], self.keys[layer].dtype)
    v = np.zeros_like(k)
    k[:n] = self.bank.keys[layer][off:off + n]
    v[:n] = self.bank.values[layer][off:off + n]
    return k, v

  def _page_in(self, layer: int, needed: list[int]) -> None:
    lru = self._lru[layer]
    if len(needed) > self.slots:
      raise ValueError(f"a request needs {len(needed)} documents but the cache has {self.slots} "
                       "pages per layer")
    missing = [r for r in needed if r not in lru]
    self.hits += len(needed) - len(missing)
    self.misses += len(missing)
    for r in needed:
      if r in lru:
        lru.move_to_end(r)
    if not missing:
      return
    used = set(lru.values())
    free = [s for s in range(self.slots) if s not in used]
    keep = set(needed)
    while len(free) < len(missing):  # evict the least recently used page not needed now
      victim = next(r for r in lru if r not in keep)
      free.append(lru.pop(victim))
    slots = free[:len(missing)]
    blocks = [self._block(layer, r) for r in missing]
    bk = np.stack([b[0] for b in blocks])
    bv = np.stack([b[1] for b in blocks])
    self.bytes_moved += bk.nbytes + bv.nbytes
    dev_slots = jax.device_put(np.asarray(slots, np.int32), self.device)
    self.keys[layer] = _write_pages(self.keys[layer], dev_slots, jax.device_put(bk, self.device))
    self.values[layer] = _write_pages(self.values[layer], dev_slots, jax.device_put(bv, self.device))
    for r, s in zip(missing, slots):
      lru[r] = s

  def fetch(self, layer: int, rows: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bank rows [B, k] (host ints, -1 = none) -> keys, values [B, k·Cmax, K, H], mask [B, k·Cmax].

    Documents are packed in ascending bank order per request, like the other content sources.
    """
    rows = np.sort(np.where(rows >= 0, rows, np.iinfo(np.int64).max), axis=-1)
    rows = np.where(rows == np.iinfo(np.int64).max, -1, rows)
    needed = sorted({int(r) for r in rows.ravel() if r >= 0})
    self._page_in(layer, needed)
    lru = self._lru[layer]
    slots = np.vectorize(lambda r: lru[int(r)] if r >= 0 else -1, otypes=[np.int32])(rows)
    counts = np.where(rows >= 0, self.bank.chunk_count[np.maximum(rows, 0)], 0)
    mask = (np.arange(self.max_chunks)[None, None, :] < counts[..., None]).reshape(rows.shape[0], -1)
    dev_slots = jax.device_put(slots, self.device)
    dev_mask = jax.device_put(mask, self.device)
    k, v = _read_pages(self.keys[layer], self.values[layer], dev_slots, dev_mask)
    return k, v, dev_mask
