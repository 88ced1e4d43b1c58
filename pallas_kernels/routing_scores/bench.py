r"""CPU benchmark of the bank routing scan ("xla" path of msa_jax.ops), as ratios to this machine.

Not a test. Everything is measured in the same process, in interleaved rounds (median over
rounds), so the ratios survive noisy, shared machines:

  read bandwidth   jitted sum over a 1 GiB float32 array
  matmul rate      bf16 x bf16 -> float32 dot, 2048³ (and float32 x float32, for CPUs without
                   native bf16, where the bf16 dot is emulated and slower than float32)
  scan, Q=1        bank_chunk_scores over a 100M-token bank (1,562,500 chunks, K=2, H=64, bf16
                   keys = 400 MB), one routing token   -> fraction of read bandwidth (goal ≥ 0.80)
  scan, Q=64       same, 64 routing tokens               -> fraction of the matmul rate (goal ≥ 0.40)
  doc top-k        bank_top_k_docs (chunk -> document max + top-16, 16 chunks per document)
                   -> fraction of the Q=1 scan time (goal ≤ 0.25); segment_max + top_k for
                   comparison

  .venv/bin/python -m pallas_kernels.routing_scores.bench [--chunks 1562500] [--rounds 3]

Needs ~2 GB of RAM at the default size (the 400 MB bank plus a 1 GiB calibration array).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _bench

from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce
from msa_jax.math import routing
from msa_jax.ops import ScanConfig, bank_chunk_scores, bank_top_k_docs


def timeit(fn, *args, repeats: int, warmup: int = 2) -> float:
  return _bench.timeit(fn, *args, repeats=repeats, warmup=warmup)


def read_bandwidth(repeats: int, nbytes: int = 1 << 30) -> float:
  """Bytes/s of a jitted float32 sum over nbytes."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  t = timeit(jax.jit(jnp.sum), x, repeats=repeats)
  del x
  return nbytes / t


def matmul_rate(repeats: int, n: int = 2048, dtype=jnp.bfloat16) -> float:
  """FLOP/s of a dtype x dtype -> float32 n³ dot."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / timeit(f, a, b, repeats=repeats)


def make_bank(chunks: int, kv_heads: int, head_dim: int, chunks_per_doc: int):
  keys = jax.random.normal(jax.random.key(0), (chunks, kv_heads, head_dim), jnp.bfloat16)
  keys = (keys * (head_dim ** -0.5)).astype(jnp.bfloat16)  # ~unit norm per head
  chunk_doc = 1 + jnp.arange(chunks, dtype=jnp.int32) // chunks_per_doc  # ids from 1
  return keys, jnp.ones((chunks,), bool), chunk_doc, int(chunk_doc[-1]) + 1


def run(args) -> dict:
  """Interleaved rounds of calibration and measurement; every number is the median over rounds
  (each itself a median of `repeats` timings), every ratio the median of per-round ratios."""
  keys, chunk_valid, chunk_doc, num_docs = make_bank(args.chunks, args.kv_heads, args.head_dim,
                                                     args.chunks_per_doc)
  key_bytes = keys.size * keys.dtype.itemsize
  scan = ScanConfig(gemv_max_rows=args.gemv_max_rows, tile_c=args.tile_c)
  queries = {}
  for t in (1, 64):
    q = jax.random.normal(jax.random.key(3), (1, t, args.heads, args.head_dim), jnp.float32)
    queries[t] = (q / jnp.linalg.norm(q, axis=-1, keepdims=True), jnp.ones((1, t), bool))
  scan_fn = lambda q, qm, keys, cv: bank_chunk_scores(
      q, qm, keys, cv, scale=1.0, head_reduce=HeadReduce.MEAN, query_reduce=QueryReduce.MAX,
      implementation="xla", scan=scan)
  fast = lambda cs, cd: bank_top_k_docs(cs, cd, num_docs, args.k, args.chunks_per_doc,
                                        ChunkReduce.MAX)
  exact = jax.jit(lambda cs, cd: routing.select_top_k(routing.doc_scores(
      cs, cd[None], num_docs, ChunkReduce.MAX), args.k))
  cs = scan_fn(*queries[1], keys, chunk_valid)
  a, b = fast(cs, chunk_doc), exact(cs, chunk_doc)

  rounds = []
  for _ in range(args.rounds):
    r = {"read_bandwidth_GBps": read_bandwidth(args.repeats) / 1e9,
         "bf16_matmul_GFLOPs": matmul_rate(args.repeats) / 1e9,
         "f32_matmul_GFLOPs": matmul_rate(args.repeats, dtype=jnp.float32) / 1e9}
    for t in (1, 64):
      sec = timeit(scan_fn, *queries[t], keys, chunk_valid, repeats=args.repeats)
      flops = 2 * t * args.kv_heads * args.head_dim * args.chunks
      r[f"scan_q{t}_ms"] = sec * 1e3
      r[f"scan_q{t}_GBps"] = key_bytes / sec / 1e9
      r[f"scan_q{t}_GFLOPs"] = flops / sec / 1e9
      r[f"scan_q{t}_frac_bandwidth"] = r[f"scan_q{t}_GBps"] / r["read_bandwidth_GBps"]
      r[f"scan_q{t}_frac_matmul"] = r[f"scan_q{t}_GFLOPs"] / r["bf16_matmul_GFLOPs"]
      r[f"scan_q{t}_frac_f32_matmul"] = r[f"scan_q{t}_GFLOPs"] / r["f32_matmul_GFLOPs"]
    r["doc_topk_ms"] = timeit(fast, cs, chunk_doc, repeats=args.repeats) * 1e3
    r["segment_max_topk_ms"] = timeit(exact, cs, chunk_doc, repeats=args.repeats) * 1e3
    r["doc_topk_frac_scan_q1"] = r["doc_topk_ms"] / r["scan_q1_ms"]
    rounds.append(r)

  res: dict = {"chunks": args.chunks, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "heads": args.heads, "repeats": args.repeats, "rounds": args.rounds,
               "backend": jax.default_backend(), "devices": str(jax.devices()[0]),
               "key_bytes": key_bytes}
  res.update({key: float(np.median([r[key] for r in rounds])) for key in rounds[0]})
  res["per_round"] = rounds
  res["doc_topk_matches_reference"] = bool(jnp.all(a[0] == b[0]) & jnp.all(a[1] == b[1]))
  res["goals"] = {
      "scan_q1_frac_bandwidth>=0.80": res["scan_q1_frac_bandwidth"] >= 0.80,
      "scan_q64_frac_matmul>=0.40": res["scan_q64_frac_matmul"] >= 0.40,
      "doc_topk_frac_scan_q1<=0.25": res["doc_topk_frac_scan_q1"] <= 0.25,
  }
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--chunks", type=int, default=1_562_500, help="bank chunks (100M tokens / 64)")
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--heads", type=int, default=2, help="query heads N (GQA groups = N / K)")
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--chunks_per_doc", type=int, default=16, help="also Cmax (1K-token documents)")
  p.add_argument("--k", type=int, default=16, help="documents to select")
  p.add_argument("--repeats", type=int, default=7, help="timings per measurement (median)")
  p.add_argument("--rounds", type=int, default=3,
                 help="interleaved calibration/measurement rounds (median)")
  p.add_argument("--gemv_max_rows", type=int, default=ScanConfig.gemv_max_rows)
  p.add_argument("--tile_c", type=int, default=ScanConfig.tile_c)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  res = run(args)
  print(f"read bandwidth          {res['read_bandwidth_GBps']:8.1f} GB/s (jit sum, 1 GiB f32)")
  print(f"bf16 matmul             {res['bf16_matmul_GFLOPs']:8.1f} GFLOP/s (2048³, f32 acc)")
  print(f"f32 matmul              {res['f32_matmul_GFLOPs']:8.1f} GFLOP/s (2048³)")
  for t in (1, 64):
    print(f"scan Q={t:<3d}              {res[f'scan_q{t}_ms']:8.2f} ms  "
          f"{res[f'scan_q{t}_GBps']:6.1f} GB/s = {res[f'scan_q{t}_frac_bandwidth']:.2f} of bw  "
          f"{res[f'scan_q{t}_GFLOPs']:6.1f} GFLOP/s = {res[f'scan_q{t}_frac_matmul']:.2f} of bf16 "
          f"/ {res[f'scan_q{t}_frac_f32_matmul']:.2f} of f32 matmul")
  print(f"doc top-{args.k} (fast)       {res['doc_topk_ms']:8.2f} ms = "
        f"{res['doc_topk_frac_scan_q1']:.2f} of the Q=1 scan; exact: "
        f"{res['doc_topk_matches_reference']}")
  print(f"segment_max + top_k     {res['segment_max_topk_ms']:8.2f} ms")
  for goal, ok in res["goals"].items():
    print(f"goal {goal}: {'met' if ok else 'MISSED'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
