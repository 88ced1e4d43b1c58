"""Top-k block gather: copy the chunks of the selected documents into one padded buffer.

Documents are contiguous runs of chunks in a bank content array [C, K, H] (pooled K̄ or V̄ of one
router layer): document d owns rows [doc_offset[d], doc_offset[d] + doc_count[d]). For the
selected documents [B, k] (bank document indices, -1 = none) the op returns

    out  [B, k·Cmax, K, H]  out[b, j·Cmax + i] = content[doc_offset[d] + i] if i < doc_count[d]
    mask [B, k·Cmax] bool   (d = selected[b, j]), zeros / False elsewhere

with Cmax = max_chunks static (every doc_count must be <= it). This is the paper's "top-k block
gathering": the attention that follows reads one dense buffer instead of the whole bank.

Kernel: grid (B, k, row tiles). Each step reads one document id, looks up its offset and count,
and copies `block_rows` rows with ONE vector-indexed load whose row indices are clamped to the
bank ([0, C-1]) and masked by the count — so a document at the very end of an unpadded bank never
reads past it, and rows of the next document never leak in.

Order of this file (as jax's Pallas ops): tile config → kernel body → pallas_call wrapper →
jitted public function → `block_gather_reference` in plain jnp.

GPU notes (not run on a GPU in this repo yet; see pallas_kernels/gpu_check.py):
- The bank is one whole-array block (under Triton it is only a pointer; nothing is staged) and
  the index tables are read as scalars inside the kernel, the Triton/Mosaic substitute for TPU
  scalar prefetch (which no GPU lowering has).
- `content_ref[rows]` with a vector of row indices is a gather load: supported by the Triton
  lowering (as in jax's paged_attention), not by Mosaic GPU, where a port would use
  `plgpu.copy_gmem_to_smem(content.at[pl.ds(start, block_rows)], ...)` on a bank padded by
  block_rows rows (or TMA gather).
- block_rows is a power of 2; Cmax is rounded up to a multiple of it and sliced afterwards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat


@dataclasses.dataclass(frozen=True)
class BlockGatherConfig:
  """Tunables of the block-gather kernel (all static).

  block_rows: chunks copied per grid step, a power of 2; None = next_power_of_2(max_chunks)
    capped at 64 (one step per document for documents up to 4K tokens at P=64).
  num_warps, num_stages: Triton launch parameters (GPU only).
  """

  block_rows: int | None = None
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.block_rows is not None and not _compat.is_power_of_2(self.block_rows):
      raise ValueError(f"{self.block_rows=} must be a power of 2 (or None)")
    if self.num_warps < 1 or not _compat.is_power_of_2(self.num_warps):
      raise ValueError(f"{self.num_warps=} must be a power of 2")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")

  def rows(self, max_chunks: int) -> int:
    return self.block_rows or min(_compat.next_power_of_2(max_chunks), 64)


# --- kernel body --------------------------------------------------------------------------------

def _block_gather_kernel(
    selected_ref,  # [B, k] int32 selected document ids (-1 = none)
    offset_ref,  # [M] int32 first chunk of each document
    count_ref,  # [M] int32 chunks of each document
    content_ref,  # [C, K*H] the whole bank (a pointer on GPU; rows gathered by index)
    o_ref,  # [1, 1, block_rows, K*H] rows [t·block_rows, (t+1)·block_rows) of document (b, j)
    *,
    max_chunks: int,
):
  b, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_docs = offset_ref.shape[0]
  num_rows = content_ref.shape[0]
  block_rows = o_ref.shape[2]
  d = selected_ref[b, j]
  ok = (d >= 0) & (d < num_docs)
  dc = jnp.clip(d, 0, num_docs - 1)
  start = offset_ref[dc]
  count = jnp.where(ok, jnp.minimum(count_ref[dc], max_chunks), 0)
  local = t * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)  # [block_rows]
  rows = jnp.clip(start + local, 0, num_rows - 1)  # clamp: never past the bank
  x = content_ref[rows, :]  # [block_rows, K*H] gather load
  o_ref[0, 0] = jnp.where((local < count)[:, None], x, jnp.zeros_like(x))


# --- pallas_call wrapper ------------------------------------------------------------------------

def _block_gather_call(selected, offset, count, content2d, *, max_chunks: int, block_rows: int,
                       config: BlockGatherConfig, interpret: bool) -> jax.Array:
  """-> [B, k, Rpad, K·H] with Rpad = max_chunks rounded up to a multiple of block_rows."""
  b, k = selected.shape
  m = offset.shape[0]
  c, kh = content2d.shape
  n_row_tiles = pl.cdiv(max_chunks, block_rows)
  kernel = functools.partial(_block_gather_kernel, max_chunks=max_chunks)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, k, n_row_tiles * block_rows, kh), content2d.dtype),
      grid=(b, k, n_row_tiles),
      in_specs=[
          pl.BlockSpec((b, k), lambda i, j, t: (0, 0)),  # selection: whole (scalars)
          pl.BlockSpec((m,), lambda i, j, t: (0,)),  # offsets: whole (scalars)
          pl.BlockSpec((m,), lambda i, j, t: (0,)),  # counts: whole (scalars)
          pl.BlockSpec((c, kh), lambda i, j, t: (0, 0)),  # bank: whole (gathered by index)
      ],
      out_specs=pl.BlockSpec((1, 1, block_rows, kh), lambda i, j, t: (i, j, t, 0)),  # rows
      compiler_params=_compat.compiler_params(interpret=interpret, num_warps=config.num_warps,
                                              num_stages=config.num_stages),
      interpret=interpret,
      name="msa_block_gather",
  )(selected, offset, count, content2d)


def gather_mask(doc_count: jax.Array, selected: jax.Array, max_chunks: int) -> jax.Array:
  """[B, k·Cmax] bool: slot i of selected document j holds a real chunk."""
  m = doc_count.shape[0]
  ok = (selected >= 0) & (selected < m)
  cnt = jnp.where(ok, doc_count[jnp.clip(selected, 0, m - 1)], 0)  # B k
  mask = jnp.arange(max_chunks)[None, None, :] < cnt[:, :, None]  # B k Cmax
  return mask.reshape(selected.shape[0], -1)


# --- public function ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("max_chunks", "config", "interpret"))
def block_gather(content: jax.Array, doc_offset: jax.Array, doc_count: jax.Array,
                 selected: jax.Array, *, max_chunks: int,
                 config: BlockGatherConfig = BlockGatherConfig(),
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Gathers the chunks of the selected documents.

  Args:
    content: [C, K, H] bank content (any dtype), documents as contiguous runs of chunks.
    doc_offset: [M] int, first chunk of each document.
    doc_count: [M] int, chunks of each document (<= max_chunks; extra chunks are dropped).
    selected: [B, k] int, document indices; -1 (or any id outside [0, M)) = none.
    max_chunks: Cmax, static.
    config: tile sizes (static).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    (out [B, k·Cmax, K, H] in content.dtype, zeros in padding rows; mask [B, k·Cmax] bool).
  """
  if max_chunks < 1:
    raise ValueError(f"{max_chunks=} must be >= 1")
  c, kv, h = content.shape
  b, k = selected.shape
  block_rows = config.rows(max_chunks)
  out = _block_gather_call(selected.astype(jnp.int32), doc_offset.astype(jnp.int32),
                           doc_count.astype(jnp.int32), content.reshape(c, kv * h),
                           max_chunks=max_chunks, block_rows=block_rows, config=config,
                           interpret=interpret)  # B k Rpad K·H
  out = out[:, :, :max_chunks].reshape(b, k * max_chunks, kv, h)
  return out, gather_mask(doc_count.astype(jnp.int32), selected, max_chunks)


# --- reference ----------------------------------------------------------------------------------

def block_gather_reference(content: jax.Array, doc_offset: jax.Array, doc_count: jax.Array,
                           selected: jax.Array, *, max_chunks: int) -> tuple[jax.Array, jax.Array]:
  """Plain-jnp reference: the XLA path of `msa_jax.ops.gather_doc_chunks` (one clamped `take` of
  every slot's row, then the mask), so the kernel and the default path are checked as one."""
  from msa_jax.ops.gather import xla_gather
  return xla_gather(content, doc_offset.astype(jnp.int32), doc_count.astype(jnp.int32),
                    selected.astype(jnp.int32), max_chunks)
