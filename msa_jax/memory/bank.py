"""The memory bank as data: what stage 1 produces and stages 2-3 read (SPEC §8).

Per router layer l and per chunk c (documents are contiguous runs of chunks, in bank order):
`keys[l] [C, K, H]` pooled attention keys (after k_norm and RoPE), `values[l] [C, K, H]` pooled
values, `routing_keys[l] [C, K, H]` pooled routing keys (L2-normalised per head when the routing
score is a cosine). Per document i: a stable id, its token count, its first chunk and chunk
count, and whether it is live (deleted documents stay in place until compaction but never route).
A template prefix, if any, keeps its K/V for every layer.

Arrays are numpy (in memory or memory-mapped from disk); the device-side routing index is built
from them by `msa_jax.memory.index`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msa_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BankSpec:
  """Everything that fixes the layout of a bank's arrays; a bank only opens for a matching model."""

  config_fingerprint: str
  router_layers: tuple[int, ...]
  num_layers: int
  num_kv_heads: int
  head_dim: int
  pooling_size: int
  dtype: str = "float32"  # storage dtype of keys / values / routing keys

  @classmethod
  def for_model(cls, cfg: ModelConfig, dtype: str = "float32") -> "BankSpec":
    return cls(config_fingerprint=cfg.fingerprint(), router_layers=cfg.msa.router_layers,
               num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               pooling_size=cfg.msa.pooling_size, dtype=dtype)


@dataclasses.dataclass
class EncodedDocs:
  """Stage-1 output for m documents, chunks concatenated in document order (host numpy)."""

  lengths: np.ndarray  # [m] int64 tokens per document (>= 1)
  keys: dict[int, np.ndarray]  # layer -> [sum chunks, K, H]
  values: dict[int, np.ndarray]
  routing_keys: dict[int, np.ndarray]

  def __len__(self) -> int:
    return int(self.lengths.shape[0])


@dataclasses.dataclass
class Template:
  """A prefix encoded once (positions 0..t-1) and prepended to every request, all layers."""

  tokens: np.ndarray  # [t]
  keys: dict[int, np.ndarray]  # layer -> [t, K, H] (after k_norm and RoPE)
  values: dict[int, np.ndarray]


@dataclasses.dataclass
class MemoryBank:
  spec: BankSpec
  doc_ids: np.ndarray  # [M] int64 stable document ids
  lengths: np.ndarray  # [M] int64
  chunk_offset: np.ndarray  # [M] int64 first chunk of each document
  chunk_count: np.ndarray  # [M] int64
  live: np.ndarray  # [M] bool
  keys: dict[int, np.ndarray]  # layer -> [C, K, H]
  values: dict[int, np.ndarray]
  routing_keys: dict[int, np.ndarray]
  template: Template | None = None

  @property
  def num_docs(self) -> int:
    return int(self.doc_ids.shape[0])

  @property
  def num_chunks(self) -> int:
    return int(self.chunk_offset[-1] + self.chunk_count[-1]) if self.num_docs else 0

  @property
  def max_chunks_per_doc(self) -> int:
    return int(self.chunk_count.max()) if self.num_docs else 0

  @property
  def chunk_doc(self) -> np.ndarray:
    """[C] bank row (0-based document index) of each chunk."""
    return np.repeat(np.arange(self.num_docs), self.chunk_count)

  def row_of(self, doc_id: int) -> int:
    rows = np.flatnonzero(self.doc_ids == doc_id)
    if rows.size == 0:
      raise KeyError(f"document id {doc_id} is not in the bank")
    return int(rows[0])

  @classmethod
  def from_encoded(cls, spec: BankSpec, enc: EncodedDocs, doc_ids: np.ndarray | None = None,
                   template: Template | None = None) -> "MemoryBank":
    counts = -(-enc.lengths.astype(np.int64) // spec.pooling_size)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ids = np.arange(len(enc), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
    return cls(spec=spec, doc_ids=ids, lengths=enc.lengths.astype(np.int64), chunk_offset=offsets,
               chunk_count=counts, live=np.ones(len(enc), bool), keys=dict(enc.keys),
               values=dict(enc.values), routing_keys=dict(enc.routing_keys), template=template)
