"""Where each document of a bank lives on the memory mesh: a shard plan.

Documents are placed whole, in bank order, as contiguous runs: shard s holds bank rows
[doc_start[s], doc_start[s+1]) and therefore the contiguous bank chunks
[chunk_start[s], chunk_start[s+1]). The split minimises the largest shard's chunk count (the
classic linear partition, solved exactly by a binary search on the capacity with a greedy fill),
so documents of very different lengths and document counts that do not divide the shard count
balance as well as whole documents allow. Every shard is padded with invalid chunks to the same
length `shard_chunks` (and to `shard_docs` document slots), as a sharded array needs.

Contiguity in bank order is what makes the sharded top-k bit-identical to the single-device one:
concatenating the shards' candidates in shard order lists equal scores in ascending bank row, so
`lax.top_k`'s ties-to-the-lower-index rule is the single-device tie rule.

With several processes each owning a local bank, the bank is the concatenation of the local banks
in process order, and each process's documents are split over that process's devices only
(`segments`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def balanced_split(chunk_counts: np.ndarray, parts: int) -> np.ndarray:
  """Boundaries [parts + 1] of a contiguous split of documents minimising the largest part.

  chunk_counts [m] (>= 0). Part p is documents [b[p], b[p+1]); later parts may be empty when
  there are fewer documents than parts.
  """
  if parts < 1:
    raise ValueError(f"{parts=} must be >= 1")
  counts = np.asarray(chunk_counts, np.int64)
  m = counts.size
  cum = np.concatenate([[0], np.cumsum(counts)])  # [m + 1]

  def fill(cap: int) -> np.ndarray | None:
    bounds = [0]
    for _ in range(parts):
      start = bounds[-1]
      # The furthest end with cum[end] - cum[start] <= cap (at least one document if any left).
      end = int(np.searchsorted(cum, cum[start] + cap, side="right")) - 1
      if end == start and start < m:
        return None
      bounds.append(min(end, m))
    return np.asarray(bounds, np.int64) if bounds[-1] == m else None

  lo = max(int(counts.max(initial=0)), -(-int(cum[-1]) // parts))
  hi = max(int(cum[-1]), lo)
  while lo < hi:
    mid = (lo + hi) // 2
    if fill(mid) is None:
      lo = mid + 1
    else:
      hi = mid
  return fill(lo)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """A placement of M documents (C chunks) on S shards. Hashable (static under jit).

  doc_start [S + 1], chunk_start [S + 1]: shard s holds rows / chunks [start[s], start[s+1]).
  shard_chunks (Cs) / shard_docs (Ms): the padded per-shard chunk and document capacity (>= 1).
  source_chunk_base [S]: the bank chunk where the local bank that stores shard s begins (0 when
  one bank holds everything; the process's first chunk for per-process banks).
  """

  doc_start: tuple[int, ...]
  chunk_start: tuple[int, ...]
  shard_chunks: int
  shard_docs: int
  source_chunk_base: tuple[int, ...]

  @property
  def num_shards(self) -> int:
    return len(self.doc_start) - 1

  @property
  def num_docs(self) -> int:
    return self.doc_start[-1]

  @property
  def num_chunks(self) -> int:
    return self.chunk_start[-1]

  @classmethod
  def from_bounds(cls, chunk_counts: np.ndarray, doc_bounds: np.ndarray,
                  source_chunk_base: Sequence[int] | None = None) -> "ShardPlan":
    counts = np.asarray(chunk_counts, np.int64)
    b = np.asarray(doc_bounds, np.int64)
    cum = np.concatenate([[0], np.cumsum(counts)])
    cs = cum[b]
    s = b.size - 1
    base = tuple(int(x) for x in (source_chunk_base if source_chunk_base is not None
                                  else np.zeros(s, np.int64)))
    return cls(doc_start=tuple(int(x) for x in b), chunk_start=tuple(int(x) for x in cs),
               shard_chunks=max(int(np.diff(cs).max(initial=0)), 1),
               shard_docs=max(int(np.diff(b).max(initial=0)), 1), source_chunk_base=base)

  # --- per-shard arrays (host numpy, laid out shard after shard) --------------------------------

  def local_chunk_doc(self, chunk_counts: np.ndarray) -> np.ndarray:
    """[S·Cs] int32: 1 + the shard-local row of each padded chunk slot, 0 for padding."""
    out = np.zeros((self.num_shards, self.shard_chunks), np.int32)
    counts = np.asarray(chunk_counts, np.int64)
    for s in range(self.num_shards):
      a, b = self.doc_start[s], self.doc_start[s + 1]
      local = np.repeat(np.arange(1, b - a + 1, dtype=np.int32), counts[a:b])
      out[s, :local.size] = local
    return out.reshape(-1)

  def local_docs(self, chunk_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[S·Ms] int32 each: shard-local first chunk and chunk count of each document slot."""
    off = np.zeros((self.num_shards, self.shard_docs), np.int32)
    cnt = np.zeros_like(off)
    counts = np.asarray(chunk_counts, np.int64)
    for s in range(self.num_shards):
      a, b = self.doc_start[s], self.doc_start[s + 1]
      cnt[s, :b - a] = counts[a:b]
      off[s, :b - a] = np.cumsum(counts[a:b]) - counts[a:b]
    return off.reshape(-1), cnt.reshape(-1)

  def shard_rows(self) -> np.ndarray:
    """[S, 2] int32: (first row, end row) of each shard."""
    b = np.asarray(self.doc_start, np.int32)
    return np.stack([b[:-1], b[1:]], axis=1)

  def row_slot(self) -> np.ndarray:
    """[M] int32: the slot of each bank row in the shards' concatenated [S·Ms] document slots."""
    b = np.asarray(self.doc_start, np.int64)
    shard = np.repeat(np.arange(self.num_shards), np.diff(b))
    return (shard * self.shard_docs + np.arange(self.num_docs) - b[shard]).astype(np.int32)

  def imbalance(self) -> float:
    """Padded shard size over the ideal C / S (1.0 = perfectly balanced)."""
    ideal = max(self.num_chunks / self.num_shards, 1e-9)
    return self.shard_chunks / ideal


def plan_shards(chunk_counts: np.ndarray, num_shards: int, *,
                segments: Sequence[tuple[int, int]] | None = None) -> ShardPlan:
  """The shard plan of documents with `chunk_counts` [M] over `num_shards` shards.

  segments: optional (documents, shards) pairs that partition the documents and shards in order
    (per-process banks: each process's documents go to its own devices only). Default: one
    segment, every document over every shard.
  """
  counts = np.asarray(chunk_counts, np.int64)
  if segments is None:
    segments = [(counts.size, num_shards)]
  if sum(n for n, _ in segments) != counts.size or sum(s for _, s in segments) != num_shards:
    raise ValueError(f"segments {list(segments)} do not cover {counts.size} documents on "
                     f"{num_shards} shards")
  bounds, bases, row, chunk = [0], [], 0, 0
  for n, s in segments:
    part = balanced_split(counts[row:row + n], s)
    bounds += [row + int(x) for x in part[1:]]
    bases += [chunk] * s
    row += n
    chunk += int(counts[row - n:row].sum())
  return ShardPlan.from_bounds(counts, np.asarray(bounds), bases)


def partition_documents(lengths: np.ndarray, parts: int, pooling_size: int) -> np.ndarray:
  """Boundaries [parts + 1] splitting documents (token `lengths`) into contiguous parts balanced
  by chunk count: e.g. which documents each process encodes into its own bank."""
  counts = -(-np.asarray(lengths, np.int64) // pooling_size)
  return balanced_split(counts, parts)
