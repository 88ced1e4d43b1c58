"""Inference-engine benchmark (not a test): encode throughput, routed-request latency and bytes
moved for banks of 16K / 1M / 10M tokens, and decode-step latency against the bank size.

  python experiments/bench_engine.py --output out/bench_engine.json

The model is a small random MSA model (d=128, 4 layers, routers at 2 and 3, 4 query / 2 kv
heads of 64, P=64). Encode throughput is measured by encoding real documents. The large banks
for the routing and decode timings are synthesised with the right shapes (random unit routing
keys, random content): routing cost depends on the sizes, not on the values, and encoding 10M
tokens would take minutes on 2 cores.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.engine import decode, encode, prefill
from msa_jax.engine.run import BankRunner, ContentPath
from msa_jax.interop import hf
from msa_jax.memory.bank import BankSpec, EncodedDocs, MemoryBank
from msa_jax.nn.model import from_params

flags.DEFINE_string("output", "out/bench_engine.json", "JSON results")
flags.DEFINE_list("bank_tokens", ["16384", "1048576", "10485760"], "bank sizes in tokens")
flags.DEFINE_integer("doc_tokens", 1024, "tokens per synthetic document")
flags.DEFINE_integer("encode_docs", 64, "documents encoded for the throughput measurement")
flags.DEFINE_integer("query_tokens", 32, "routing tokens per request")
flags.DEFINE_integer("repeats", 7, "timed repeats (median reported)")
FLAGS = flags.FLAGS

CFG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                  msa=MSAConfig(top_k_docs=16, pooling_size=64, router_layers=(2, 3)))


def median_ms(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def synthetic_bank(tokens: int, doc_tokens: int, seed: int = 0) -> MemoryBank:
  m = max(1, tokens // doc_tokens)
  c = m * (-(-doc_tokens // CFG.msa.pooling_size))
  rng = np.random.default_rng(seed)
  shape = (c, CFG.num_kv_heads, CFG.head_dim)

  def unit():
    a = rng.standard_normal(shape, np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  layers = CFG.msa.router_layers
  enc = EncodedDocs(lengths=np.full(m, doc_tokens, np.int64),
                    keys={l: rng.standard_normal(shape, np.float32) for l in layers},
                    values={l: rng.standard_normal(shape, np.float32) for l in layers},
                    routing_keys={l: unit() for l in layers})
  return MemoryBank.from_encoded(BankSpec.for_model(CFG), enc)


def request(b: int, t: int) -> prefill.Request:
  rng = np.random.default_rng(1)
  k = CFG.msa.top_k_docs
  return prefill.Request.from_arrays({
      "input_ids": rng.integers(0, CFG.vocab_size, (b, t)),
      "doc_ids": np.zeros((b, t), np.int64),
      "attention_mask": np.ones((b, t), np.int64),
      "position_ids": np.broadcast_to(np.arange(k, k + t), (b, t)).copy()})


def bench_encode(model) -> dict:
  rng = np.random.default_rng(2)
  n, length = FLAGS.encode_docs, FLAGS.doc_tokens
  tokens = rng.integers(0, CFG.vocab_size, (n, length))
  lengths = np.full(n, length)
  encode.encode_documents(model, tokens[:8], lengths[:8])  # compile
  t = time.perf_counter()
  encode.encode_documents(model, tokens, lengths)
  dt = time.perf_counter() - t
  return {"documents": n, "tokens": int(lengths.sum()), "seconds": dt,
          "tokens_per_s": float(lengths.sum() / dt)}


def bench_bank(model, tokens: int) -> dict:
  bank = synthetic_bank(tokens, FLAGS.doc_tokens)
  req = jax.device_put(request(1, FLAGS.query_tokens))
  row = {"bank_tokens": tokens, "documents": bank.num_docs, "chunks": bank.num_chunks}
  for path in (ContentPath.CALLBACK, ContentPath.PAGED):
    runner = BankRunner(model, bank, content=path, page_slots=64)
    before = runner.bytes_moved
    out, state = runner.prefill(req, 8)
    jax.block_until_ready(out.logits)
    row[f"{path.value}_cold_bytes"] = runner.bytes_moved - before
    ms = median_ms(lambda: jax.block_until_ready(runner.prefill(req, 8)[0].logits), FLAGS.repeats)
    row[f"{path.value}_request_ms"] = ms
    if path is ContentPath.CALLBACK:
      before = runner.bytes_moved
      runner.prefill(req, 8)[0].logits.block_until_ready()
      row["callback_bytes_per_request"] = runner.bytes_moved - before
      row["_decode"] = (runner.graphdef, runner.state, state)
  return row


def main(argv):
  del argv
  model = from_params(CFG, hf.init_params(CFG, 0))
  results = {"backend": jax.default_backend(), "devices": str(jax.devices()),
             "config": {"d": CFG.hidden_size, "layers": CFG.num_layers,
                        "router_layers": list(CFG.msa.router_layers), "P": CFG.msa.pooling_size,
                        "k": CFG.msa.top_k_docs, "kv_heads": CFG.num_kv_heads,
                        "head_dim": CFG.head_dim, "query_tokens": FLAGS.query_tokens},
             "encode": bench_encode(model)}
  print(json.dumps(results["encode"]))
  rows = []
  for tokens in map(int, FLAGS.bank_tokens):
    rows.append(bench_bank(model, tokens))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}))
  # Decode steps of all banks measured round-robin in the same time window, so that load from
  # other processes hits every bank alike. The step is not donated here: the state is reused.
  step = jax.jit(decode.decode_step, static_argnums=(0,))
  tok = jnp.zeros((1,), jnp.int32)
  samples = {i: [] for i in range(len(rows))}
  for i, r in enumerate(rows):
    g, s, st = r["_decode"]
    jax.block_until_ready(step(g, s, st, tok)[0])
  for _ in range(5 * FLAGS.repeats):
    for i, r in enumerate(rows):
      g, s, st = r["_decode"]
      t = time.perf_counter()
      jax.block_until_ready(step(g, s, st, tok)[0])
      samples[i].append(time.perf_counter() - t)
  for i, r in enumerate(rows):
    del r["_decode"]
    r["decode_step_ms"] = 1e3 * float(np.median(samples[i]))
    print(f"bank {r['bank_tokens']}: decode step {r['decode_step_ms']:.3f} ms")
  results["banks"] = rows
  if len(rows) >= 2:
    results["decode_ratio_largest_vs_smallest"] = rows[-1]["decode_step_ms"] / rows[0]["decode_step_ms"]
    print(f"decode step {rows[-1]['bank_tokens']} vs {rows[0]['bank_tokens']} tokens: "
          f"{results['decode_ratio_largest_vs_smallest']:.2f}x")
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
