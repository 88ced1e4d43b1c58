"""Top-k block gather: the chunks of the selected documents as one dense padded buffer.

`gather_doc_chunks(content [C, K, H], doc_offset [M], doc_count [M], selected [B, k])` returns
(out [B, k·Cmax, K, H], mask [B, k·Cmax]): slot j·Cmax + i of sample b holds chunk i of document
selected[b, j] (its chunks are the contiguous rows doc_offset[d] .. + doc_count[d]); padding slots,
and every slot of a -1 (or out-of-range) selection, are zeros with mask False. Row indices are
clamped to the bank, so an unpadded bank is never read past its end.

implementation: "xla" (default off GPU) is one clamped `jnp.take` of k·Cmax rows per sample plus
a select (43-50 µs for 16 × 64 rows on CPU, performance_notes A4); "pallas" (default on GPU) is
the kernel in pallas_kernels/block_gather (interpret mode off GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from msa_jax.ops import _dispatch


def xla_gather(content, doc_offset, doc_count, selected, max_chunks):
  c = content.shape[0]
  m = doc_offset.shape[0]
  b, k = selected.shape
  ok = (selected >= 0) & (selected < m)  # B k
  sel = jnp.clip(selected, 0, m - 1)
  start = jnp.where(ok, doc_offset[sel], 0)  # B k
  count = jnp.where(ok, jnp.minimum(doc_count[sel], max_chunks), 0)  # B k
  i = jnp.arange(max_chunks)
  rows = jnp.clip(start[:, :, None] + i, 0, c - 1).reshape(b, k * max_chunks)
  mask = (i[None, None, :] < count[:, :, None]).reshape(b, k * max_chunks)
  out = jnp.take(content, rows, axis=0, mode="clip")  # B k·Cmax K H
  return jnp.where(mask[:, :, None, None], out, jnp.zeros((), content.dtype)), mask


@functools.partial(jax.jit, static_argnames=("max_chunks", "implementation", "pallas_config"))
def gather_doc_chunks(content: jax.Array, doc_offset: jax.Array, doc_count: jax.Array,
                      selected: jax.Array, *, max_chunks: int,
                      implementation: _dispatch.Implementation | None = None,
                      pallas_config=None) -> tuple[jax.Array, jax.Array]:
  """Gathers the selected documents' chunks: (out [B, k·Cmax, K, H], mask [B, k·Cmax] bool).

  Args:
    content: [C, K, H] bank content (pooled K̄ or V̄ of one router layer), any dtype.
    doc_offset: [M] int, first chunk of each document.
    doc_count: [M] int, chunks of each document; chunks past max_chunks are dropped.
    selected: [B, k] int, document indices (-1 = none), in the order the slots should have.
    max_chunks: Cmax, static.
    implementation: "xla" | "pallas" | None (= "pallas" on GPU, "xla" elsewhere).
    pallas_config: a BlockGatherConfig for "pallas".
  """
  if max_chunks < 1:
    raise ValueError(f"{max_chunks=} must be >= 1")
  if _dispatch.resolve(implementation) == "pallas":
    from pallas_kernels.block_gather import BlockGatherConfig, block_gather
    return block_gather(content, doc_offset, doc_count, selected, max_chunks=max_chunks,
                        config=pallas_config or BlockGatherConfig(),
                        interpret=_dispatch.interpret())
  return xla_gather(content, doc_offset.astype(jnp.int32), doc_count.astype(jnp.int32),
                     selected.astype(jnp.int32), max_chunks)
