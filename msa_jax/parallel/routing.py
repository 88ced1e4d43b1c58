"""Memory Parallel routing (SPEC §9): the routing index sharded over the `memory` mesh axis.

`ShardedRoutingIndex` duck-types `msa_jax.memory.index.RoutingIndex`: the same replicated global
fields the content sources read (doc_offset, doc_count, max_chunks, chunk_row, live, num_docs)
and the same `.route(...)`, so `route_and_prefill`, `route_and_prefill_paged` and `BankRunner`
run unchanged with it. Routing runs under `shard_map`:

1. the routing queries are broadcast (replicated) to every shard;
2. each shard scores its own chunks (`ops.bank_chunk_scores`, the tiled XLA scan) and keeps its
   local top-k documents (`ops.bank_top_k_docs`) as (score, global bank row);
3. the S·k candidates are all-gathered and a global `lax.top_k` picks the winners. Shards are
   contiguous runs of the bank (see `placement`), so the gathered candidates list equal scores in
   ascending bank row and the tie rule (lower row wins) is the single-device one: the selection
   is bit-identical to `RoutingIndex.route` for the same chunk scores.

Only the winners' K̄/V̄ are then fetched from their owner (`ShardedDeviceContent`,
`ShardedHostContent`; in one process `HostContent` and `PageCache` also work unchanged, since all
host memory is shared). The owner fills its winners' slots, every other shard contributes zeros,
and a `psum` over the bit patterns (as unsigned integers: exact, unlike a float sum, which turns
-0.0 into +0.0) assembles the result on every device.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from msa_jax import ops
from msa_jax.math import routing
from msa_jax.memory.bank import MemoryBank
from msa_jax.memory.index import chunk_rows, sort_selected
from msa_jax.parallel import mesh as mesh_lib
from msa_jax.parallel.mesh import MEMORY
from msa_jax.parallel.placement import ShardPlan, plan_shards

NEG_INF = -jnp.inf


# --- global metadata and the sources of each shard's data -----------------------------------------

@dataclasses.dataclass
class _Global:
  """Replicated host metadata of the whole (possibly multi-process) bank."""

  lengths: np.ndarray  # [M] int64
  live: np.ndarray  # [M] bool
  doc_ids: np.ndarray  # [M] int64
  chunk_count: np.ndarray  # [M] int64

  @property
  def chunk_offset(self) -> np.ndarray:
    return np.cumsum(self.chunk_count) - self.chunk_count


def _allgather_concat(a: np.ndarray) -> np.ndarray:
  """Concatenation, in process order, of every process's 1-D array (lengths may differ)."""
  from jax.experimental import multihost_utils
  n = np.asarray(multihost_utils.process_allgather(np.array([a.size], np.int64))).reshape(-1)
  padded = np.zeros(int(n.max(initial=0)), a.dtype)
  padded[:a.size] = a
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(n.size, -1)
  return np.concatenate([every[p, :n[p]] for p in range(n.size)]).astype(a.dtype)


def _shard_of(idx: tuple[slice, ...], size: int) -> int:
  """The shard whose rows [s·size, (s+1)·size) a make_array_from_callback index names."""
  start = idx[0].start or 0
  return start // size


def _padded_chunks(source, plan: ShardPlan, s: int, tail: tuple[int, ...], dtype) -> np.ndarray:
  """Shard s's chunks of `source` (the local bank's [c, K, H] array), padded to Cs rows."""
  a, b = plan.chunk_start[s], plan.chunk_start[s + 1]
  base = plan.source_chunk_base[s]
  out = np.zeros((plan.shard_chunks,) + tail, dtype)
  if b > a:
    out[:b - a] = np.asarray(source[a - base:b - base])
  return out


def _sharded_chunks(mesh: Mesh, plan: ShardPlan, source) -> jax.Array:
  """A [S·Cs, K, H] array sharded along `memory`, each device reading only its shard."""
  tail, dtype = tuple(source.shape[1:]), source.dtype
  size = plan.shard_chunks
  return mesh_lib.global_array(mesh, P(MEMORY), (plan.num_shards * size,) + tail, dtype,
                               lambda idx: _padded_chunks(source, plan, _shard_of(idx, size),
                                                          tail, dtype))


def _sharded_host(mesh: Mesh, a: np.ndarray) -> jax.Array:
  """A host array [S·n, ...] (the same on every process) sharded along `memory`."""
  return mesh_lib.global_array(mesh, P(MEMORY), a.shape, a.dtype, lambda idx: a[idx])


def psum_exact(x: jax.Array, axis_name: str = MEMORY) -> jax.Array:
  """Sum over shards where at most one shard holds a non-zero element: bit-exact, any dtype."""
  if x.dtype == jnp.bool_:
    return lax.psum(x.astype(jnp.int32), axis_name) > 0
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
  wide = jnp.uint32 if x.dtype.itemsize < 4 else bits
  u = lax.bitcast_convert_type(x, bits).astype(wide)
  return lax.bitcast_convert_type(lax.psum(u, axis_name).astype(bits), x.dtype)


# --- the index ------------------------------------------------------------------------------------

@struct.dataclass
class ShardedRoutingIndex:
  """The routing index sharded by whole documents over a mesh's `memory` axis.

  Sharded along `memory` (S shards, Cs chunk slots and Ms document slots each):
    routing_keys[l] [S·Cs, K, H]; shard_chunk_doc [S·Cs] (1 + shard-local row, 0 = padding);
    shard_rows [S, 2] (first, end bank row); shard_doc_offset / shard_doc_count [S·Ms] (each
    document slot's first chunk within the shard and chunk count; for device content).
  Replicated, in global bank rows / chunks (what the content sources read):
    chunk_row [C], live [M], doc_offset [M], doc_count [M], doc_ids [M] (stable ids),
    row_slot [M] (each row's slot in the gathered [S·Ms] per-shard document scores).
  """

  routing_keys: dict[int, jax.Array]
  shard_chunk_doc: jax.Array
  shard_rows: jax.Array
  shard_doc_offset: jax.Array
  shard_doc_count: jax.Array
  chunk_row: jax.Array
  live: jax.Array
  doc_offset: jax.Array
  doc_count: jax.Array
  doc_ids: jax.Array
  row_slot: jax.Array
  max_chunks: int = struct.field(pytree_node=False)
  plan: ShardPlan = struct.field(pytree_node=False)
  mesh: Mesh = struct.field(pytree_node=False)
  # How each shard scans its chunks (ops.ScanConfig: tile size of the "xla" path). The default
  # is RoutingIndex's, which bit-identity with the single-device selection relies on.
  scan: ops.ScanConfig = struct.field(pytree_node=False, default=ops.ScanConfig())

  @property
  def num_docs(self) -> int:
    return int(self.live.shape[0])

  def route(self, q: jax.Array, query_mask: jax.Array, layer: int, cfg, *,
            with_doc_scores: bool = False):
    """`RoutingIndex.route` over the shards: rows [B, k] (-1 padded), scores [B, k] and, with
    `with_doc_scores`, every bank row's score [B, M] (-inf for deleted rows).

    q [B, T, N, H] routing queries, query_mask [B, T]; k = cfg.msa.top_k_docs.
    """
    m = cfg.msa
    k = m.top_k_docs
    scale = m.routing_score.scale(cfg.head_dim)
    local_docs = self.plan.shard_docs
    num_docs = self.num_docs

    def local(q, query_mask, keys, chunk_doc, rows, live):
      # keys [Cs, K, H], chunk_doc [Cs], rows [1, 2]: this shard's part.
      first = rows[0, 0]
      row = first + chunk_doc - 1  # bank row of each chunk slot
      valid = (chunk_doc > 0) & live[jnp.clip(row, 0, num_docs - 1)]
      cs = ops.bank_chunk_scores(q, query_mask, keys, valid, scale=scale,
                                 head_reduce=m.head_reduce, query_reduce=m.query_reduce,
                                 scan=self.scan)  # B Cs
      ids, scores = ops.bank_top_k_docs(cs, chunk_doc, local_docs + 1, k, self.max_chunks,
                                        m.chunk_reduce)  # local ids 1..Ms, -1 = none
      cand = jnp.where(ids > 0, first + ids - 1, -1)
      # Shard order = bank order: equal scores come out in ascending row, as on one device.
      all_scores = lax.all_gather(scores, MEMORY, axis=1, tiled=True)  # B S·k
      all_rows = lax.all_gather(cand, MEMORY, axis=1, tiled=True)
      top, j = lax.top_k(all_scores, k)
      picked = jnp.where(top > NEG_INF, jnp.take_along_axis(all_rows, j, axis=1), -1)
      out = (picked.astype(jnp.int32), top)
      if with_doc_scores:
        cd = jnp.broadcast_to(chunk_doc[None], cs.shape)
        ds = routing.doc_scores(cs, cd, local_docs + 1, m.chunk_reduce)[:, 1:]  # B Ms
        out += (lax.all_gather(ds, MEMORY, axis=1, tiled=True),)  # B S·Ms
      return out

    n_out = 3 if with_doc_scores else 2
    fn = mesh_lib.shard_map(local, self.mesh,
                            in_specs=(P(), P(), P(MEMORY), P(MEMORY), P(MEMORY), P()),
                            out_specs=(P(),) * n_out)
    res = fn(q, query_mask, self.routing_keys[layer], self.shard_chunk_doc, self.shard_rows,
             self.live)
    ds = jnp.take(res[2], self.row_slot, axis=1) if with_doc_scores else None
    return res[0], res[1], ds

  # --- construction -----------------------------------------------------------------------------

  @classmethod
  def _build(cls, mesh: Mesh, plan: ShardPlan, meta: _Global, local_bank: MemoryBank
             ) -> "ShardedRoutingIndex":
    chunk_doc = plan.local_chunk_doc(meta.chunk_count)
    off, cnt = plan.local_docs(meta.chunk_count)
    rep = lambda a: mesh_lib.replicated(mesh, a)
    return cls(
        routing_keys={l: _sharded_chunks(mesh, plan, a)
                      for l, a in local_bank.routing_keys.items()},
        shard_chunk_doc=_sharded_host(mesh, chunk_doc),
        shard_rows=_sharded_host(mesh, plan.shard_rows()),
        shard_doc_offset=_sharded_host(mesh, off),
        shard_doc_count=_sharded_host(mesh, cnt),
        chunk_row=rep(np.repeat(np.arange(meta.chunk_count.size), meta.chunk_count)
                      .astype(np.int32)),
        live=rep(meta.live.astype(bool)),
        doc_offset=rep(meta.chunk_offset.astype(np.int32)),
        doc_count=rep(meta.chunk_count.astype(np.int32)),
        doc_ids=rep(meta.doc_ids.astype(np.int32)),
        row_slot=rep(plan.row_slot()),
        max_chunks=max(int(meta.chunk_count.max(initial=0)), 1),
        plan=plan, mesh=mesh)

  @classmethod
  def from_bank(cls, bank: MemoryBank, mesh: Mesh) -> "ShardedRoutingIndex":
    """Shards a whole bank over the mesh (documents balanced by chunk count).

    With several processes every process passes the same bank (e.g. memory-mapped from a shared
    file system); each device reads only its own shard's routing keys.
    """
    if bank.num_docs < 1:
      raise ValueError("cannot shard an empty bank")
    plan = plan_shards(bank.chunk_count, mesh_lib.mesh_size(mesh))
    meta = _Global(lengths=bank.lengths, live=bank.live, doc_ids=bank.doc_ids,
                   chunk_count=bank.chunk_count.astype(np.int64))
    return cls._build(mesh, plan, meta, bank)

  @classmethod
  def from_process_banks(cls, local_bank: MemoryBank, mesh: Mesh) -> "ShardedRoutingIndex":
    """Builds the index from per-process banks: each process passes its own bank, and the bank
    is their concatenation in process order. Each process's documents are balanced over its own
    devices; only metadata (lengths, ids, liveness) crosses processes. Call on every process."""
    runs = mesh_lib.process_runs(mesh)
    if len(runs) == 1:
      return cls.from_bank(local_bank, mesh)
    lengths = _allgather_concat(np.asarray(local_bank.lengths, np.int64))
    live = _allgather_concat(np.asarray(local_bank.live, np.int8)).astype(bool)
    ids = _allgather_concat(np.asarray(local_bank.doc_ids, np.int64))
    per_proc = _allgather_concat(np.array([local_bank.num_docs], np.int64))
    if np.any(per_proc < 1):
      raise ValueError(f"every process needs a non-empty bank, got document counts {per_proc}")
    if np.unique(ids).size != ids.size:
      raise ValueError("document ids repeat across the processes' banks")
    counts = -(-lengths // local_bank.spec.pooling_size)
    plan = plan_shards(counts, mesh_lib.mesh_size(mesh),
                       segments=[(int(per_proc[i]), n) for i, (_, n) in enumerate(runs)])
    meta = _Global(lengths=lengths, live=live, doc_ids=ids, chunk_count=counts)
    return cls._build(mesh, plan, meta, local_bank)

  def with_live(self, live: np.ndarray) -> "ShardedRoutingIndex":
    """The same index with a new liveness vector [M] (documents deleted / restored)."""
    return self.replace(live=mesh_lib.replicated(self.mesh, np.asarray(live, bool)))


# --- content sources ------------------------------------------------------------------------------

@struct.dataclass
class ShardedDeviceContent:
  """Content K̄/V̄ resident on device, sharded like the routing keys: keys[l], values[l]
  [S·Cs, K, H]. The owner of each winner gathers it; the others add zeros (exact psum)."""

  keys: dict[int, jax.Array]
  values: dict[int, jax.Array]

  @classmethod
  def from_bank(cls, bank: MemoryBank, index: ShardedRoutingIndex) -> "ShardedDeviceContent":
    """bank: the whole bank (one process) or this process's bank (`from_process_banks`)."""
    put = lambda a: _sharded_chunks(index.mesh, index.plan, a)
    return cls(keys={l: put(a) for l, a in bank.keys.items()},
               values={l: put(a) for l, a in bank.values.items()})

  def gather(self, layer, selected, index: ShardedRoutingIndex):
    sel = sort_selected(selected)
    cmax = index.max_chunks

    def local(keys, values, off, cnt, rows, sel):
      own = (sel >= rows[0, 0]) & (sel < rows[0, 1])  # B k: winners this shard holds
      lsel = jnp.where(own, sel - rows[0, 0], -1)
      k, mask = ops.gather_doc_chunks(keys, off, cnt, lsel, max_chunks=cmax)
      v, _ = ops.gather_doc_chunks(values, off, cnt, lsel, max_chunks=cmax)
      return psum_exact(k), psum_exact(v), psum_exact(mask)

    fn = mesh_lib.shard_map(local, index.mesh, in_specs=(P(MEMORY),) * 5 + (P(),),
                            out_specs=(P(), P(), P()))
    return fn(self.keys[layer], self.values[layer], index.shard_doc_offset,
              index.shard_doc_count, index.shard_rows, sel)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class ShardedHostContent:
  """Content K̄/V̄ in each process's host memory or memory-mapped files, read by its owner.

  Inside `shard_map`, each shard's host callback reads only the winners it owns from `bank` (this
  process's bank: the whole bank with `from_bank`, the local one with `from_process_banks`); the
  slots are assembled by an exact psum. Works across processes, where `HostContent` (which reads
  any row from one in-process bank) cannot. A static pytree, hashed by identity.
  """

  bank: MemoryBank
  counter: dict = dataclasses.field(default_factory=lambda: {"bytes": 0, "calls": 0})
  # The shards' callbacks run on concurrent threads: the counter's updates take this lock.
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

  @property
  def bytes_moved(self) -> int:
    return self.counter["bytes"]

  def _read(self, layer: int, base: tuple[int, ...], rows, own, shard):
    keys, values = self.bank.keys[layer], self.bank.values[layer]
    shape = rows.shape + tuple(keys.shape[1:])
    flat = np.asarray(rows).reshape(-1).astype(np.int64)
    ok = np.asarray(own).reshape(-1)
    k = np.zeros((flat.size,) + tuple(keys.shape[1:]), keys.dtype)
    v = np.zeros_like(k)
    if ok.any():
      local = flat[ok] - base[int(np.asarray(shard).reshape(-1)[0])]
      k[ok] = np.asarray(keys[local])
      v[ok] = np.asarray(values[local])
    with self.lock:
      self.counter["bytes"] += int(ok.sum()) * (k.itemsize + v.itemsize) * int(np.prod(k.shape[1:]))
      self.counter["calls"] += 1
    return k.reshape(shape), v.reshape(shape)

  def gather(self, layer, selected, index: ShardedRoutingIndex):
    rows, valid = chunk_rows(index.doc_offset, index.doc_count, sort_selected(selected),
                             index.max_chunks)  # B k·Cmax global chunk rows
    ref = self.bank.keys[layer]
    out = jax.ShapeDtypeStruct(rows.shape + tuple(ref.shape[1:]), ref.dtype)
    plan = index.plan
    starts = np.asarray(plan.chunk_start, np.int32)

    def local(rows, valid):
      s = lax.axis_index(MEMORY)
      lo, hi = jnp.asarray(starts)[s], jnp.asarray(starts)[s + 1]
      own = valid & (rows >= lo) & (rows < hi)
      k, v = jax.pure_callback(
          lambda r, o, sh: self._read(layer, plan.source_chunk_base, r, o, sh), (out, out),
          rows, own, s.reshape(1))
      return psum_exact(k), psum_exact(v)

    fn = mesh_lib.shard_map(local, index.mesh, in_specs=(P(), P()), out_specs=(P(), P()))
    k, v = fn(rows, valid)
    return k, v, valid
