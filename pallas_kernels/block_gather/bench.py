r"""Benchmark of the top-k block gather (not a test).

Gathers k documents x Cmax chunks from a bank of C chunks with both implementations of
`msa_jax.ops.gather_doc_chunks` and prints time and copied bytes per second:

  .venv/bin/python -m pallas_kernels.block_gather.bench [--chunks 1562500] [--k 16] [--cmax 16]

Off GPU the "pallas" path runs in the Pallas interpreter (a correctness path, slow by design),
so by default it is timed on a small bank only (--pallas_chunks).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._bench import timeit

from msa_jax.ops import gather_doc_chunks




@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def make_bank(chunks: int, kv_heads: int, head_dim: int, cmax: int, k: int):
  m = chunks // cmax
  content = jax.random.normal(jax.random.key(0), (chunks, kv_heads, head_dim), jnp.bfloat16)
  offset = jnp.arange(m, dtype=jnp.int32) * cmax
  count = jnp.full((m,), cmax, jnp.int32)
  selected = ((jnp.arange(k, dtype=jnp.int32) * 7919) % m)[None]
  return content, offset, count, selected


def run(args) -> dict:
  res = {"backend": jax.default_backend(), "k": args.k, "cmax": args.cmax}
  for impl, chunks in (("xla", args.chunks), ("pallas", args.pallas_chunks or args.chunks)):
    bank = make_bank(chunks, args.kv_heads, args.head_dim, args.cmax, args.k)
    fn = jax.jit(functools.partial(gather_doc_chunks, max_chunks=args.cmax, implementation=impl))
    sec = timeit(fn, *bank, repeats=args.repeats)
    nbytes = args.k * args.cmax * args.kv_heads * args.head_dim * 2
    res[impl] = {"chunks": chunks, "us": sec * 1e6, "GBps": nbytes / sec / 1e9, "bytes": nbytes}
    del bank
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--chunks", type=int, default=1_562_500)
  p.add_argument("--pallas_chunks", type=int, default=None,
                 help="bank size for the pallas timing (default: 4096 off GPU, --chunks on GPU)")
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--k", type=int, default=16)
  p.add_argument("--cmax", type=int, default=16)
  p.add_argument("--repeats", type=int, default=21)
  args = p.parse_args(argv)
  if args.pallas_chunks is None and jax.default_backend() != "gpu":
    args.pallas_chunks = 4096
  res = run(args)
  for impl in ("xla", "pallas"):
    r = res[impl]
    print(f"{impl:6s} bank {r['chunks']:>9d} chunks: {r['us']:9.1f} µs  {r['GBps']:6.2f} GB/s "
          f"({r['bytes']} bytes)")
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
