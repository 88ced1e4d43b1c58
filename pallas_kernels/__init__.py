"""Pallas kernels for MSA's hot paths, one folder per op: kernel, pure-jnp reference, tile
config, parity tests and benchmark. `msa_jax` reaches them only through an `implementation=`
choice whose plain-XLA path (the functions in `msa_jax.math`) always works.

- `routing_scores/`: fused routing scores of a memory bank, [B, T, N, H] x [C, K, H] -> [B, C]
  with the head and query reductions applied tile by tile (never [B, T, N, C]); `bench.py` is the
  CPU benchmark of the "xla" scan it is compared against.
- `block_gather/`: the selected documents' chunks into one padded [B, k·Cmax, K, H] buffer.
- `gpu_check.py`: one script that compiles both on a GPU, checks parity on device, times them
  against the "xla" paths and reports bandwidth fractions as JSON (`--small --interpret` on CPU).
- `_compat.py`: the Pallas API differences between jax 0.10 and 0.11 (GPU backend choice).

Kernels run in interpret mode on CPU (`interpret=True`); the public entry points are
`msa_jax.ops.bank_chunk_scores` and `msa_jax.ops.gather_doc_chunks`.
"""
