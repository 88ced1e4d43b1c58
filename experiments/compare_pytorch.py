"""msa-jax's dense forward against transformers' PyTorch Qwen3 on the same weights: logits and speed.

  python experiments/compare_pytorch.py                 # the shipped demo model, 2 x 256 tokens
  python experiments/compare_pytorch.py --checkpoint=tests/data/official_msa_tiny/ckpt \\
      --batch=1 --length=32 --repeats=1 --output=/tmp/compare.json

prints a table of tokens/s of each implementation (median of --repeats timed calls after a warm-up
call, the same random batch for both), the largest |logit difference| between them and the ratio
JAX/PyTorch tokens/s; then the largest differences per array between `msa-jax forward` and the
official PyTorch MSA outputs on the official fixture (tests/data/official_msa_tiny). Writes all of
it as JSON to --output. Exit status 1 when the logits differ by more than --tolerance or the
fixture comparison fails.

The dense path is the model without router layers and with every token role -1 (no memory), i.e.
plain causal attention: what a Qwen3 model computes. Both sides run in float32.
"""

import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from msa_jax import cli, demo  # noqa: E402
from msa_jax import forward as fw  # noqa: E402
from msa_jax.interop import transformers as tr  # noqa: E402
from msa_jax.nn.model import MSAForCausalLM, from_params  # noqa: E402

_DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "official_msa_tiny"

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "HF-format MSA checkpoint directory (default: the shipped demo).")
_BATCH = flags.DEFINE_integer("batch", 2, "Rows of the random batch.")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per implementation, after one warm-up.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random token ids.")
_ATTN = flags.DEFINE_enum("attn_implementation", "sdpa", ["sdpa", "eager"],
                          "transformers attention kernel (sdpa: its default and fastest on CPU).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch intra-op threads; 0: every core this process may run on. On a "
    "machine busy with other work, 1 avoids OpenMP threads waiting on descheduled ones.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-3, "Largest accepted |logit difference| (float32).")
_FIXTURE = flags.DEFINE_string("fixture", str(_DATA),
                               "Folder with the official fixture.npz and ckpt/; empty: skip it.")
_OUTPUT = flags.DEFINE_string("output", "out/compare_pytorch.json", "Where to write the JSON.")

# Official fixture tolerances, as in tests/test_official_fixtures.py: logits on valid tokens
# (absolute), document scores (absolute, same -inf pattern), selections identical, losses relative.
LOGITS_ATOL, SCORES_ATOL, LOSS_RTOL = 1e-5, 1e-6, 1e-5


def float32(model: MSAForCausalLM) -> MSAForCausalLM:
  return from_params(model.cfg, cli._to_float32(nnx.to_pure_dict(nnx.state(model))))


def random_ids(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int64)


def _timed(call, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def jax_dense(model: MSAForCausalLM, ids: np.ndarray, repeats: int):
  """(logits [B, T, V] float32, seconds of each timed call) of msa-jax's dense forward."""
  b, t = ids.shape
  batch = fw.Batch.from_arrays(dict(
      input_ids=ids, doc_ids=np.full_like(ids, -1), attention_mask=np.ones_like(ids),
      position_ids=np.broadcast_to(np.arange(t), (b, t))))
  graphdef, state = nnx.split(model)
  shapes = fw.BatchShapes.of(batch, model.cfg.msa.pooling_size)
  # Only the jitted call is timed: batch validation and sizing are host work done once.
  call = lambda: fw.forward_jit(graphdef, state, batch, shapes, with_losses=False).logits
  logits = np.asarray(call().block_until_ready(), np.float32)  # warm-up: compiles
  return logits, _timed(lambda: call().block_until_ready(), repeats)


def torch_dense(torch_model, ids: np.ndarray, repeats: int):
  """(logits [B, T, V] float32, seconds of each timed call) of transformers' Qwen3."""
  import torch
  device = next(torch_model.parameters()).device
  x = torch.from_numpy(ids).to(device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def call():
    out = torch_model(input_ids=x, use_cache=False).logits
    sync()  # CUDA calls return before the work is done
    return out

  with torch.inference_mode():
    logits = call().float().cpu().numpy()  # warm-up
    return logits, _timed(call, repeats)


def dense_comparison(model: MSAForCausalLM, *, batch: int, length: int, repeats: int, seed: int,
                     attn_implementation: str = "sdpa", torch_threads: int = 0) -> dict:
  """Logit difference and tokens/s of msa-jax's dense path and transformers' Qwen3 (float32)."""
  import torch
  import transformers

  # By default both sides use every core this process may run on (JAX's CPU backend does).
  torch.set_num_threads(torch_threads or len(os.sched_getaffinity(0)))
  transformers.utils.logging.disable_progress_bar()  # "Loading weights" would clutter the table
  model = tr.dense(float32(model))
  torch_model = tr.to_transformers(model, attn_implementation=attn_implementation)
  if torch.cuda.is_available():
    torch_model = torch_model.cuda()
  ids = random_ids(model.cfg.vocab_size, batch, length, seed)
  ours, jax_s = jax_dense(model, ids, repeats)
  theirs, torch_s = torch_dense(torch_model, ids, repeats)
  # The median call: robust to other work on a shared machine.
  jax_tps = ids.size / statistics.median(jax_s)
  torch_tps = ids.size / statistics.median(torch_s)
  return {
      "batch": batch, "length": length, "repeats": repeats, "seed": seed,
      "attn_implementation": attn_implementation,
      "max_abs_logit_diff": max_abs_diff(ours, theirs),
      "max_abs_logit": float(np.max(np.abs(theirs))),
      "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps, "ratio": jax_tps / torch_tps,
      "jax_seconds": jax_s, "torch_seconds": torch_s,
      "devices": {"jax": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
                  "torch": f"{next(torch_model.parameters()).device.type}, "
                           f"threads={torch.get_num_threads()}"},
      # Timings are only comparable on an otherwise idle machine; this says whether it was.
      "cores": len(os.sched_getaffinity(0)), "load_average_1min": os.getloadavg()[0],
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__},
  }


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  """Largest |a - b|; inf when the shapes differ or a value is not finite on one side only."""
  if a.shape != b.shape or not np.array_equal(np.isfinite(a), np.isfinite(b)):
    return float("inf")
  fin = np.isfinite(a)
  return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))


def compare_arrays(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   valid: np.ndarray) -> dict[str, dict]:
  """Per array present in both: max_abs_diff, the tolerance it is held to, ok (and cli's verdict)."""
  verdicts = dict(cli.compare(ours, reference, valid))
  rows = {}
  for name in sorted(verdicts):
    a, b = ours[name], reference[name]
    if name.startswith("selected_docs"):
      diff, tol = (0.0 if a.shape == b.shape and np.array_equal(a, b) else float("inf")), 0.0
    else:
      if name == "logits" and a.shape == b.shape:
        a, b = a[valid], b[valid]
      diff = max_abs_diff(np.asarray(a, np.float64), np.asarray(b, np.float64))
      if name == "logits":
        tol = LOGITS_ATOL
      elif name.startswith("doc_scores"):
        tol = SCORES_ATOL
      else:  # a loss
        tol = LOSS_RTOL * max(1.0, float(np.max(np.abs(b), initial=0.0)))
    rows[name] = {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol,
                  "verdict": verdicts[name]}
  return rows


def fixture_comparison(data: pathlib.Path) -> dict[str, dict]:
  """`msa-jax forward` of ckpt/ on fixture.npz against the official outputs stored with it."""
  with np.load(data / "fixture.npz") as f:
    reference = dict(f)
  ours = cli.forward_outputs(str(data / "ckpt"), reference)
  return compare_arrays(ours, reference, reference["attention_mask"].astype(bool))


def failures(result: dict, tolerance: float) -> list[str]:
  """Why the run failed (empty: it passed)."""
  out = []
  if not result["max_abs_logit_diff"] <= tolerance:  # also catches nan
    out.append(f"max |logit diff| {result['max_abs_logit_diff']:.3g} > tolerance {tolerance:g}")
  fixture = result.get("fixture")
  if fixture is not None:
    if not fixture:
      out.append("the fixture comparison found no common arrays")
    out += [f"fixture {name}: {r['verdict']} (tolerance {r['tolerance']:g})"
            for name, r in fixture.items() if not r["ok"]]
  return out


def write_json_atomic(path: pathlib.Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file
  finally:
    tmp.unlink(missing_ok=True)


def main(argv):
  del argv
  if _CHECKPOINT.value:
    model = cli._load_model(_CHECKPOINT.value)
  else:
    model, _, _ = demo.load()
  result = {"checkpoint": _CHECKPOINT.value or f"shipped demo ({demo.path()})",
            **dense_comparison(model, batch=_BATCH.value, length=_LENGTH.value,
                               repeats=_REPEATS.value, seed=_SEED.value,
                               attn_implementation=_ATTN.value,
                               torch_threads=_TORCH_THREADS.value)}
  r = result
  print(f"{r['checkpoint']}: batch {r['batch']} x {r['length']} tokens, median of "
        f"{r['repeats']} calls")
  print(f"{'implementation':<28} {'device':<20} {'tokens/s':>12} {'ms/call':>9}")
  torch_name = f"transformers Qwen3 ({r['attn_implementation']})"
  for name, key in (("msa-jax (dense, jit)", "jax"), (torch_name, "torch")):
    ms = 1e3 * statistics.median(r[f"{key}_seconds"])
    print(f"{name:<28} {r['devices'][key]:<20} {r[f'{key}_tokens_per_s']:>12.0f} {ms:>9.2f}")
  print(f"ratio JAX/PyTorch tokens/s: {r['ratio']:.2f}")
  if r["load_average_1min"] > r["cores"]:  # more runnable work than this run alone brings
    print(f"warning: load average {r['load_average_1min']:.1f} on {r['cores']} cores: other work "
          "skews the timings (PyTorch's OpenMP threads most; try --torch_threads=1)",
          file=sys.stderr)
  print(f"max |logit diff|: {r['max_abs_logit_diff']:.3g} (max |logit| {r['max_abs_logit']:.3g}, "
        f"tolerance {_TOLERANCE.value:g})")
  result["tolerance"] = _TOLERANCE.value
  result["fixture"] = None
  if _FIXTURE.value:
    result["fixture"] = fixture_comparison(pathlib.Path(_FIXTURE.value))
    print(f"msa-jax forward vs official PyTorch outputs ({_FIXTURE.value}/fixture.npz):")
    for name, row in result["fixture"].items():
      print(f"  {name:<22} {row['verdict']:<24} {'ok' if row['ok'] else 'FAIL'}")
  problems = failures(result, _TOLERANCE.value)
  result["ok"] = not problems
  write_json_atomic(pathlib.Path(_OUTPUT.value), result)
  print(f"wrote {_OUTPUT.value}")
  for p in problems:
    print(f"error: {p}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  app.run(main)
