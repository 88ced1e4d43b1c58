"""Memory Parallel benchmark (not a test): routing latency of one bank on 1..n devices of the
`memory` mesh, and the per-device memory of a 100M-token bank computed from the bank format.

  python experiments/bench_parallel.py --memory_devices=1,2 --bank_tokens=16777216 \
      --output out/bench_parallel.json

On CPU, `--memory_devices` also sets the number of simulated CPU devices (the largest count
listed). Simulated devices share the host's cores, so on CPU this measures the overhead of the
sharded program (local top-k, all-gather, global top-k), not a speed-up; on a multi-GPU host the
same flags shard the routing keys over real devices.

The bank is synthetic (random unit routing keys in bf16 with the demo model's shape: routing cost
depends on sizes, not values). Every timed configuration is checked to select exactly what one
device selects. The memory table applies the bank format (per chunk and router layer: K̄, V̄, K̄ᴿ
of [kv heads, head dim] each) and the shard plan (whole documents, padded shards) to 100M tokens of
documents for the demo model and for MSA-4B's shape, beside the paper's 56 GB / 169 GB.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

flags.DEFINE_list("memory_devices", ["1", "2"], "device counts of the memory mesh to compare")
flags.DEFINE_integer("bank_tokens", 16 * 1024 * 1024, "tokens in the timed bank")
flags.DEFINE_integer("doc_tokens", 1024, "mean tokens per document (lengths 1 .. 2x-1)")
flags.DEFINE_integer("query_tokens", 32, "routing tokens per request")
flags.DEFINE_integer("batch", 1, "requests per routing call")
flags.DEFINE_integer("top_k", 16, "documents selected")
flags.DEFINE_integer("repeats", 11, "timed repeats (median reported)")
flags.DEFINE_integer("memory_tokens", 100_000_000, "bank size of the memory table")
flags.DEFINE_string("output", "out/bench_parallel.json", "JSON results")
FLAGS = flags.FLAGS

PAPER_GB = {"routing_keys": 56.0, "total": 169.0}  # the paper's 100M-token estimate (§3.4.2)
SHAPES = {  # router layers, kv heads, head dim; P = 64, bf16
    "demo": (2, 2, 64),
    "MSA-4B": (18, 8, 128),
}


def doc_lengths(tokens: int, mean: int, seed: int = 0):
  """Random document lengths 1 .. 2·mean-1 summing to `tokens`."""
  import numpy as np
  rng = np.random.default_rng(seed)
  n = tokens // mean + 16
  lengths = rng.integers(1, 2 * mean, n)
  while lengths.sum() < tokens:
    lengths = np.concatenate([lengths, rng.integers(1, 2 * mean, n // 8 + 1)])
  cum = np.cumsum(lengths)
  m = int(np.searchsorted(cum, tokens)) + 1
  lengths = lengths[:m]
  lengths[-1] -= int(cum[m - 1] - tokens)
  return lengths


def memory_table(tokens: int, mean_doc: int, device_counts=(1, 2, 4, 8)) -> list[dict]:
  """Bytes of a `tokens` bank in the bank format, total and per device of the shard plan, for
  documents of exactly `mean_doc` tokens and of random lengths 1 .. 2·mean_doc-1 (whose partial
  last chunks add about half a chunk per document)."""
  import numpy as np

  from msa_jax.parallel import plan_shards
  fixed = np.full(-(-tokens // mean_doc), mean_doc)
  fixed[-1] -= int(fixed.sum() - tokens)
  rows = []
  for docs, lengths in (("fixed", fixed), ("random", doc_lengths(tokens, mean_doc))):
    counts = -(-lengths // 64)
    for name, (layers, kv, hd) in SHAPES.items():
      per_tensor = layers * kv * hd * 2  # bytes per chunk per tensor (bf16) over router layers
      for n in device_counts:
        plan = plan_shards(counts, n)
        rk = plan.shard_chunks * per_tensor  # per device, padded shard
        rows.append({
          "model": name, "docs": docs, "devices": n, "documents": int(lengths.size),
          "chunks": int(counts.sum()),
          "routing_keys_total_GB": counts.sum() * per_tensor / 1e9,
          "content_total_GB": 2 * counts.sum() * per_tensor / 1e9,
          "total_GB": 3 * counts.sum() * per_tensor / 1e9,
          "total_GiB": 3 * counts.sum() * per_tensor / 2**30,
          "routing_keys_per_device_GB": rk / 1e9,
          "all_on_device_per_device_GB": 3 * rk / 1e9,
          "shard_imbalance": plan.imbalance(),
        })
  return rows


def main(argv):
  del argv
  counts = sorted({int(x) for x in FLAGS.memory_devices})
  import jax
  if max(counts) > 1:  # simulated CPU devices (ignored by GPU/TPU backends); before first use
    jax.config.update("jax_num_cpu_devices", max(counts))
  import jax.numpy as jnp
  import ml_dtypes
  import numpy as np

  from msa_jax import parallel
  from msa_jax.config import ModelConfig, MSAConfig
  from msa_jax.memory.bank import BankSpec, MemoryBank
  from msa_jax.memory.index import RoutingIndex

  cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                    msa=MSAConfig(top_k_docs=FLAGS.top_k, pooling_size=64, router_layers=(2, 3)))
  layer = 2
  lengths = doc_lengths(FLAGS.bank_tokens, FLAGS.doc_tokens)
  chunk_count = -(-lengths // 64)
  c = int(chunk_count.sum())
  rng = np.random.default_rng(0)
  keys = rng.standard_normal((c, cfg.num_kv_heads, cfg.head_dim), np.float32)
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  bank = MemoryBank(spec=BankSpec.for_model(cfg, "bfloat16"), doc_ids=np.arange(lengths.size),
                    lengths=lengths, chunk_offset=np.cumsum(chunk_count) - chunk_count,
                    chunk_count=chunk_count, live=np.ones(lengths.size, bool), keys={}, values={},
                    routing_keys={layer: keys.astype(ml_dtypes.bfloat16)})
  del keys
  q = rng.standard_normal((FLAGS.batch, FLAGS.query_tokens, cfg.num_heads, cfg.head_dim),
                          np.float32)
  q = jnp.asarray(q / np.linalg.norm(q, axis=-1, keepdims=True))
  mask = jnp.ones(q.shape[:2], bool)
  route = jax.jit(lambda index, q, mask: index.route(q, mask, layer, cfg)[:2])

  def timed(index):
    out = jax.block_until_ready(route(index, q, mask))  # compile
    times = []
    for _ in range(FLAGS.repeats):
      t = time.perf_counter()
      jax.block_until_ready(route(index, q, mask))
      times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times)), np.asarray(out[0])

  results = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
             "bank_tokens": int(lengths.sum()), "documents": int(lengths.size), "chunks": c,
             "routing_key_bytes": int(c * cfg.num_kv_heads * cfg.head_dim * 2),
             "query_tokens": FLAGS.query_tokens, "batch": FLAGS.batch, "top_k": FLAGS.top_k,
             "routing": []}
  base_ms, base_rows = timed(RoutingIndex.from_bank(bank))
  results["routing"].append({"index": "RoutingIndex (one device)", "devices": 1, "ms": base_ms})
  print(f"bank: {lengths.sum():,} tokens, {lengths.size:,} documents, {c:,} chunks "
        f"({results['routing_key_bytes'] / 1e6:.0f} MB of routing keys, one layer, bf16)")
  print(f"  RoutingIndex, one device: {base_ms:8.2f} ms")
  for n in counts:
    index = parallel.ShardedRoutingIndex.from_bank(bank, parallel.make_memory_mesh(n))
    ms, rows = timed(index)
    same = bool(np.array_equal(rows, base_rows))
    results["routing"].append({"index": "ShardedRoutingIndex", "devices": n, "ms": ms,
                               "same_selection": same,
                               "shard_chunks": index.plan.shard_chunks})
    print(f"  ShardedRoutingIndex, {n} device(s): {ms:8.2f} ms  (same selection: {same}, "
          f"{index.plan.shard_chunks:,} chunks per shard)")

  results["memory"] = memory_table(FLAGS.memory_tokens, FLAGS.doc_tokens)
  results["paper_GB"] = PAPER_GB
  print(f"\n{FLAGS.memory_tokens:,} tokens in documents of {FLAGS.doc_tokens} tokens (fixed) or "
        f"1 .. {2 * FLAGS.doc_tokens - 1} (random), P=64, bf16. Paper, MSA-4B: routing keys "
        f"~{PAPER_GB['routing_keys']:.0f} GB, total ~{PAPER_GB['total']:.0f} GB")
  print(f"{'model':>7} {'docs':>6} {'dev':>4} {'chunks':>10} {'K̄R total':>10} {'K̄+V̄ total':>11} "
        f"{'total':>9} {'K̄R/device':>11} {'all/device':>11}")
  for r in results["memory"]:
    print(f"{r['model']:>7} {r['docs']:>6} {r['devices']:>4} {r['chunks']:>10,} "
          f"{r['routing_keys_total_GB']:>8.2f}GB {r['content_total_GB']:>9.2f}GB "
          f"{r['total_GB']:>7.2f}GB {r['routing_keys_per_device_GB']:>9.3f}GB "
          f"{r['all_on_device_per_device_GB']:>9.3f}GB")
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  app.run(main)
