"""Stage 1 split across devices and processes.

- `encode_documents_sharded`: data parallel over a mesh. Each length bucket's document batch is
  sharded along `memory` (rows padded to a multiple of the device count with empty documents),
  the weights are replicated, and every device encodes its rows. Same bank as
  `engine.encode.encode_documents` up to float rounding.
- `encode_to_process_bank`: multi-host encoding. The documents are split into contiguous parts
  balanced by chunk count (`placement.partition_documents`), one per process; each process
  encodes its part on its own devices into its own on-disk bank (document ids = global document
  indices), resumably. Serving then opens each process's bank and builds the index with
  `ShardedRoutingIndex.from_process_banks`.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from msa_jax.engine import encode as stage1
from msa_jax.memory.bank import BankSpec, EncodedDocs, MemoryBank
from msa_jax.nn.model import MSAForCausalLM
from msa_jax.parallel import mesh as mesh_lib
from msa_jax.parallel.mesh import MEMORY
from msa_jax.parallel.placement import partition_documents


def encode_documents_sharded(model: MSAForCausalLM, tokens: np.ndarray, lengths: np.ndarray,
                             mesh: Mesh, *, dtype=np.float32, batch_tokens: int = 8192,
                             progress: Callable[[int, int], None] | None = None) -> EncodedDocs:
  """`encode_documents` with every batch sharded over the mesh's devices (this process's own:
  use `mesh.local_mesh()` under `jax.distributed`). Returns chunks in document order."""
  return stage1.encode_documents(model, tokens, lengths, dtype=dtype, batch_tokens=batch_tokens,
                                 progress=progress, mesh=mesh, axis=MEMORY)


def process_documents(lengths: np.ndarray, pooling_size: int, process_index: int | None = None,
                      process_count: int | None = None) -> tuple[int, int]:
  """The contiguous document range [start, end) that process `process_index` encodes."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  bounds = partition_documents(lengths, n, pooling_size)
  return int(bounds[p]), int(bounds[p + 1])


def encode_to_process_bank(model: MSAForCausalLM, tokens: np.ndarray, lengths: np.ndarray,
                           path, *, mesh: Mesh | None = None, process_index: int | None = None,
                           process_count: int | None = None, template: np.ndarray | None = None,
                           dtype: str = "float32", shard_docs: int = 1024,
                           batch_tokens: int = 8192,
                           progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
  """Encodes this process's part of the documents into its own bank at `path` (resumable).

  tokens [M, Lmax], lengths [M]: all documents (every process passes the same). The process
  encodes documents [start, end) of `process_documents` on `mesh` (default: its own devices),
  appending committed bank shards of `shard_docs` documents with ids = global indices; a killed
  encode resumes after the last committed shard. Returns (start, end).
  """
  import ml_dtypes

  from msa_jax.memory.store import BankWriter
  from msa_jax.nn.model import weights_fingerprint

  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  cfg = model.cfg
  start, end = process_documents(lengths, cfg.msa.pooling_size, process_index, process_count)
  mesh = mesh_lib.local_mesh() if mesh is None else mesh
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  tpl = None if template is None else stage1.encode_template(model, template, np_dtype)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  sha = stage1.fingerprint(tokens[start:end], lengths[start:end])
  with BankWriter(path, BankSpec.for_model(cfg, dtype), template=tpl,
                  weights_sha256=weights_fingerprint(model)) as writer:
    if end == start:  # more processes than document groups: this one's bank stays empty
      return start, end
    # The bank remembers what it was encoded from: resume only this process's same documents.
    record = writer.input_record(sha)
    if record is None:
      if writer.next_doc_id:
        raise stage1.EncodeError(f"{path} holds documents encoded from another input; a "
                                 "process bank resumes only its own documents")
      record = writer.new_input(sha, end - start, first_id=start)
    done = start + record.committed
    base_tokens = int(lengths[start:done].sum())
    for s in range(done, end, shard_docs):
      e = min(s + shard_docs, end)
      step = (lambda d, t, s=s, b=base_tokens: progress(s - start + d, b + t)) if progress else None
      enc = encode_documents_sharded(model, tokens[s:e], lengths[s:e], mesh, dtype=np_dtype,
                                     batch_tokens=batch_tokens, progress=step)
      record = writer.append_input(enc, record)
      base_tokens += int(lengths[s:e].sum())
  return start, end


def open_process_banks(paths, *, verify: bool = True, mmap: bool = True) -> MemoryBank:
  """The per-process banks at `paths` (in process order) opened as one bank in this process:
  e.g. to serve a bank encoded by several hosts from one host, on any device count."""
  from msa_jax.memory.store import ChunkArray, open_bank

  banks = [open_bank(p, verify=verify, mmap=mmap) for p in paths]
  if not banks:
    raise ValueError("no bank paths given")
  spec = banks[0].spec
  if any(b.spec != spec for b in banks):
    raise ValueError("the process banks were written for different models or dtypes")
  ids = np.concatenate([b.doc_ids for b in banks])
  if np.unique(ids).size != ids.size:
    raise ValueError("document ids repeat across the process banks")
  counts = np.concatenate([b.chunk_count for b in banks])

  def cat(kind: str, lazy: bool):
    out = {}
    for l in spec.router_layers:
      parts = [p for b in banks for p in (getattr(b, kind)[l].parts
                                          if isinstance(getattr(b, kind)[l], ChunkArray)
                                          else [getattr(b, kind)[l]]) if len(p)]
      out[l] = ChunkArray(parts) if lazy and len(parts) > 1 else np.concatenate(parts)
    return out

  return MemoryBank(spec=spec, doc_ids=ids, lengths=np.concatenate([b.lengths for b in banks]),
                    chunk_offset=np.cumsum(counts) - counts, chunk_count=counts,
                    live=np.concatenate([b.live for b in banks]), keys=cat("keys", mmap),
                    values=cat("values", mmap), routing_keys=cat("routing_keys", False),
                    template=banks[0].template)
