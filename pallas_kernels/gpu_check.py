r"""One-shot device check of the Pallas kernels: compile, parity, timing, bandwidth. JSON out.

On a GPU (H100/H200; a few minutes):

  python -m pallas_kernels.gpu_check --out /tmp/gpu_check.json

On CPU, as CI does (tiny sizes, kernels in the Pallas interpreter; seconds):

  python -m pallas_kernels.gpu_check --small --interpret --out /tmp/gpu_check.json

Sections, each in its own try/except so one failure records its error and the rest still run
(the JSON is rewritten after every section, so even a crash or a kill leaves what was measured):

  env         jax version, backend, device kind
  bandwidth   device-to-device copy (read + write of a 2 GiB buffer, `-x`) and read (`jnp.sum`)
  routing     for the bank of a 100M-token memory (1,562,500 chunks, P=64) in bf16 and two key
              shapes, "msa4b" (N=32, K=8, H=128: 3.2 GB per router layer) and "tiny" (N=2, K=2,
              H=64: 400 MB), and Q ∈ {1, 64} routing tokens: parity of the Pallas kernel with the
              "xla" path on device, both timed; achieved bandwidth (key bytes / time) as a
              fraction of the copy and read bandwidths; first-call (compile) times. On GPU, a
              small block_c sweep.
  doc_topk    bank_top_k_docs (chunk-level top-(k·Cmax+1) + dedupe) vs segment_max + top_k:
              equality and time
  gather      the block-gather kernel vs the "xla" gather (16 documents x 16 chunks): equality
              and time

--small shrinks the bank to a few thousand chunks and the heads (for CI on CPU); --interpret
runs the kernels in the Pallas interpreter (implied when the backend is not a GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._bench import timeit

from msa_jax.config import ChunkReduce, HeadReduce, QueryReduce
from msa_jax.math import routing as math_routing
from msa_jax.ops import bank_chunk_scores, bank_top_k_docs, gather_doc_chunks
from pallas_kernels.block_gather import BlockGatherConfig, block_gather
from pallas_kernels.routing_scores import RoutingScoresConfig, routing_scores

CHUNKS_100M = 1_562_500  # 100M tokens / P=64
SHAPES = {  # name: (N query heads, K kv heads, H head dim)
    "msa4b": (32, 8, 128),
    "tiny": (2, 2, 64),
}
SMALL_SHAPES = {"msa4b": (6, 2, 32), "tiny": (2, 2, 16)}
TOL = {"bfloat16": 2e-2, "float32": 1e-4}  # |pallas - xla| on cosine-like scores


def first_call(fn: Callable, *args) -> float:
  """Seconds of the first call (trace + lower + compile + one run)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0




class Report:
  """Results by section; every section runs under `section()`, errors are recorded, not raised."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.data: dict[str, Any] = {"errors": {}}

  def section(self, name: str, fn: Callable[[], Any]):
    t0 = time.perf_counter()
    try:
      self.data[name] = fn()
    except Exception as e:  # noqa: BLE001 - the point is to keep going
      self.data["errors"][name] = f"{type(e).__name__}: {e}"
      self.data[name] = {"error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=20)}
    self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 3)
    self.write()

  def write(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.data, indent=1, default=str))


def _env(args) -> dict:
  dev = jax.devices()[0]
  import jaxlib  # pylint: disable=g-import-not-at-top
  from pallas_kernels import _compat  # pylint: disable=g-import-not-at-top
  triton = _compat.gpu_compiler_params(num_warps=4, num_stages=2) is not None
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
          "pallas_gpu_lowering": "triton" if triton else "default (Mosaic GPU)",
          "device_kind": getattr(dev, "device_kind", str(dev)), "num_devices": jax.device_count(),
          "python": platform.python_version(), "interpret": args.interpret, "small": args.small}


def _bandwidth(args) -> dict:
  nbytes = (64 << 20) if args.small else (2 << 30)
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda x: -x)  # reads and writes nbytes
  read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  t_copy = timeit(copy, x, repeats=args.repeats)
  t_read = timeit(read, x, repeats=args.repeats)
  del x
  return {"bytes": nbytes, "copy_ms": t_copy * 1e3, "copy_GBps": 2 * nbytes / t_copy / 1e9,
          "read_ms": t_read * 1e3, "read_GBps": nbytes / t_read / 1e9}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _bank(c: int, k: int, h: int):
  """Unit-norm bf16 routing keys [C, K, H] and chunk validity [C] (a few invalid chunks)."""
  keys = jax.random.normal(jax.random.key(0), (c, k, h), jnp.float32)
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  return keys.astype(jnp.bfloat16), jnp.arange(c) % 97 != 13


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _queries(b: int, t: int, n: int, h: int):
  q = jax.random.normal(jax.random.key(1), (b, t, n, h), jnp.float32)
  return q / jnp.linalg.norm(q, axis=-1, keepdims=True), jnp.ones((b, t), bool)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _content(c: int, k: int, h: int, per_doc: int):
  """Bank content [C, K, H] bf16, documents of per_doc chunks (every third one half as long),
  and 16 selected documents [1, 16]: spread over the bank, the last document first, one -1."""
  m = c // per_doc
  content = jax.random.normal(jax.random.key(5), (c, k, h), jnp.bfloat16)
  offset = jnp.arange(m, dtype=jnp.int32) * per_doc
  count = jnp.where(jnp.arange(m) % 3 == 0, per_doc // 2, per_doc).astype(jnp.int32)
  selected = (jnp.arange(16, dtype=jnp.int32) * 7919) % m
  selected = selected.at[0].set(m - 1).at[-1].set(-1)[None]
  return content, offset, count, selected


def _compare(a, b) -> dict:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  same_inf = bool(np.array_equal(np.isneginf(a), np.isneginf(b)))
  fin = np.isfinite(a) & np.isfinite(b)
  err = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
  return {"max_abs_err": err, "same_neg_inf": same_inf}


def _sizes(args) -> tuple[int, dict]:
  shapes = SMALL_SHAPES if args.small else SHAPES
  return (args.small_chunks if args.small else args.chunks), {n: shapes[n] for n in args.shapes}


def _routing(args, bw: dict) -> dict:
  c, shapes = _sizes(args)
  copy_bw = bw.get("copy_GBps") if isinstance(bw, dict) else None
  read_bw = bw.get("read_GBps") if isinstance(bw, dict) else None
  out: dict[str, Any] = {"chunks": c}
  for name, (n, k, h) in shapes.items():
    keys, valid = _bank(c, k, h)
    key_bytes = keys.size * keys.dtype.itemsize
    out[name] = {"N": n, "K": k, "H": h, "key_bytes": key_bytes}
    for t in args.tokens:
      row: dict[str, Any] = {}
      out[name][f"q{t}"] = row
      try:
        q, qm = _queries(1, t, n, h)
        kw = dict(scale=1.0, head_reduce=HeadReduce.MEAN, query_reduce=QueryReduce.MAX)
        xla = lambda q, qm, keys, valid: bank_chunk_scores(q, qm, keys, valid,
                                                           implementation="xla", **kw)
        configs = [RoutingScoresConfig(block_c=bc) for bc in args.block_c]
        row["xla_first_call_s"] = first_call(xla, q, qm, keys, valid)
        ref = xla(q, qm, keys, valid)
        row["xla_ms"] = timeit(xla, q, qm, keys, valid, repeats=args.repeats) * 1e3
        best = None
        for cfg in configs:  # one failing tile size must not lose the others
          entry: dict[str, Any] = {}
          row[f"pallas_block_c{cfg.block_c}"] = entry
          try:
            pal = lambda q, qm, keys, valid, cfg=cfg: routing_scores(
                q, qm, keys, valid, 1.0, head_reduce=kw["head_reduce"],
                query_reduce=kw["query_reduce"], config=cfg, interpret=args.interpret)
            entry["first_call_s"] = first_call(pal, q, qm, keys, valid)
            entry.update(_compare(pal(q, qm, keys, valid), ref))
            entry["ok"] = entry["same_neg_inf"] and entry["max_abs_err"] <= TOL["bfloat16"]
            entry["ms"] = timeit(pal, q, qm, keys, valid, repeats=args.repeats) * 1e3
            if best is None or entry["ms"] < best[1]:
              best = (cfg.block_c, entry["ms"])
          except Exception as e:  # noqa: BLE001
            entry["ok"] = False
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=20)
        row["parity_ok"] = all(v["ok"] for key, v in row.items() if key.startswith("pallas_block"))
        if best is None:
          raise RuntimeError("every Pallas tile size failed; see the pallas_block_c* entries")
        row["pallas_best_block_c"], row["pallas_ms"] = best
        for impl in ("xla", "pallas"):
          gbps = key_bytes / (row[f"{impl}_ms"] / 1e3) / 1e9
          row[f"{impl}_GBps"] = gbps
          row[f"{impl}_frac_copy_bw"] = gbps / copy_bw if copy_bw else None
          row[f"{impl}_frac_read_bw"] = gbps / read_bw if read_bw else None
      except Exception as e:  # noqa: BLE001 - record and go on with the next shape
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=20)
    del keys
  return out


def _doc_topk(args) -> dict:
  c, _ = _sizes(args)
  per_doc, k = 16, 16
  cs = jax.random.normal(jax.random.key(4), (1, c), jnp.float32)
  chunk_doc = 1 + jnp.arange(c, dtype=jnp.int32) // per_doc
  num_docs = (c - 1) // per_doc + 2
  fast = jax.jit(lambda cs, cd: bank_top_k_docs(cs, cd, num_docs, k, per_doc, ChunkReduce.MAX))
  exact = jax.jit(lambda cs, cd: math_routing.select_top_k(math_routing.doc_scores(
      cs, cd[None], num_docs, ChunkReduce.MAX), k))
  a, b = fast(cs, chunk_doc), exact(cs, chunk_doc)
  return {"equal": bool(jnp.all(a[0] == b[0]) & jnp.all(a[1] == b[1])),
          "fast_ms": timeit(fast, cs, chunk_doc, repeats=args.repeats) * 1e3,
          "segment_max_ms": timeit(exact, cs, chunk_doc, repeats=args.repeats) * 1e3}


def _gather(args) -> dict:
  c, shapes = _sizes(args)
  out = {}
  for name, (_, k, h) in shapes.items():
    per_doc = 16
    content, offset, count, selected = _content(c, k, h, per_doc)
    xla = lambda *a: gather_doc_chunks(*a, max_chunks=per_doc, implementation="xla")
    pal = lambda *a: block_gather(*a, max_chunks=per_doc, config=BlockGatherConfig(),
                                  interpret=args.interpret)
    first_xla = first_call(xla, content, offset, count, selected)
    first_pal = first_call(pal, content, offset, count, selected)
    a, b = xla(content, offset, count, selected), pal(content, offset, count, selected)
    out[name] = {"equal": bool(jnp.all(a[0] == b[0]) & jnp.all(a[1] == b[1])),
                 "xla_first_call_s": first_xla, "pallas_first_call_s": first_pal,
                 "xla_us": timeit(xla, content, offset, count, selected,
                                  repeats=args.repeats) * 1e6,
                 "pallas_us": timeit(pal, content, offset, count, selected,
                                     repeats=args.repeats) * 1e6,
                 "bytes": int(16 * per_doc * k * h * 2)}
    del content
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="JSON output path")
  p.add_argument("--small", action="store_true", help="tiny sizes (CI on CPU)")
  p.add_argument("--interpret", action="store_true",
                 help="run the Pallas kernels in the interpreter (implied off GPU)")
  p.add_argument("--chunks", type=int, default=CHUNKS_100M)
  p.add_argument("--small_chunks", type=int, default=1037, help="bank size with --small")
  p.add_argument("--tokens", type=int, nargs="+", default=None,
                 help="routing tokens Q (default: 1 64; with --small: 1)")
  p.add_argument("--block_c", type=int, nargs="+", default=None,
                 help="routing tiles to try (default: 64 128 256 on GPU, 256 otherwise)")
  p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 20; small 1)")
  p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
  p.add_argument("--sections", nargs="+",
                 default=["env", "bandwidth", "routing", "doc_topk", "gather"])
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  args.interpret = args.interpret or not gpu
  args.tokens = args.tokens or ([1] if args.small else [1, 64])
  args.block_c = args.block_c or ([64, 128, 256] if gpu and not args.small else [256])
  args.repeats = args.repeats or (1 if args.small else 20)

  rep = Report(pathlib.Path(args.out))
  runs = {"env": lambda: _env(args), "bandwidth": lambda: _bandwidth(args),
          "routing": lambda: _routing(args, rep.data.get("bandwidth", {})),
          "doc_topk": lambda: _doc_topk(args), "gather": lambda: _gather(args)}
  for name in args.sections:
    rep.section(name, runs[name])
  rep.data["ok"] = not rep.data["errors"]
  rep.write()
  print(json.dumps({k: v for k, v in rep.data.items() if k != "routing"}, indent=1,
                   default=str)[:4000])
  if isinstance(rep.data.get("routing"), dict):
    for name in args.shapes:
      for t in args.tokens:
        row = rep.data["routing"].get(name, {}).get(f"q{t}", {})
        print(f"routing {name} Q={t}: " + ", ".join(
            f"{key}={row[key]:.3g}" for key in ("xla_ms", "pallas_ms", "xla_frac_copy_bw",
                                                 "pallas_frac_copy_bw")
            if isinstance(row.get(key), (int, float))) + (f" error={row['error']}"
                                                          if "error" in row else ""))
  return rep.data


if __name__ == "__main__":
  main()
