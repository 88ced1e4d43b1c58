"""`msa-jax` command-line tool.

  msa-jax forward --checkpoint DIR --batch IN.npz --output OUT.npz [--reference REF.npz]

runs the training-path forward in float32 on a SPEC §13 batch and writes `logits`,
`doc_scores_L{l}`, `selected_docs_L{l}` (and the losses when the batch has labels). With
`--reference`, it also prints the largest difference from another run's outputs of the same names
(e.g. the official PyTorch code's), on valid tokens only.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np


def _write_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def forward_outputs(checkpoint: str, batch_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays `msa-jax forward` writes, as numpy (names exactly as in SPEC §13)."""
  from msa_jax import forward as fw  # deferred: keeps `--help` fast
  from msa_jax.interop import hf
  from msa_jax.nn.model import from_params

  cfg, params = hf.load_checkpoint(checkpoint)
  params = _to_float32(params)
  batch = fw.Batch.from_arrays(batch_arrays)
  out = fw.run(from_params(cfg, params), batch)
  arrays = {"logits": np.asarray(out.logits, np.float32)}
  for l in sorted(out.doc_scores):
    arrays[f"doc_scores_L{l}"] = np.asarray(out.doc_scores[l], np.float32)
    arrays[f"selected_docs_L{l}"] = np.asarray(out.selected[l], np.int64)
  if out.losses is not None:
    for name in ("loss", "lm_loss", "aux_loss", "answer_loss", "reconstruction_loss"):
      arrays[name] = np.asarray(getattr(out.losses, name), np.float32)
  return arrays


def _to_float32(params):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            valid: np.ndarray) -> list[tuple[str, str]]:
  """(name, verdict) for every array present in both; logits are compared on valid tokens."""
  rows = []
  for name in sorted(set(ours) & set(reference)):
    a, b = ours[name], reference[name]
    if a.shape != b.shape:
      rows.append((name, f"shape {a.shape} vs {b.shape}"))
    elif name.startswith("selected_docs"):
      rows.append((name, "identical" if np.array_equal(a, b) else f"differ: {a.tolist()} vs {b.tolist()}"))
    else:
      if name == "logits":
        a, b = a[valid], b[valid]
      same_inf = np.array_equal(np.isinf(a), np.isinf(b))
      fin = np.isfinite(a) & np.isfinite(b)
      diff = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
      rows.append((name, f"max|diff| {diff:.3g}" + ("" if same_inf else " (inf pattern differs)")))
  return rows


def _cmd_forward(args) -> int:
  from msa_jax.config import ConfigError
  from msa_jax.forward import BatchError
  from msa_jax.interop.hf import CheckpointError

  try:
    with np.load(args.batch) as f:
      batch_arrays = dict(f)
  except (OSError, ValueError) as e:
    print(f"error: cannot read batch {args.batch}: {e}", file=sys.stderr)
    return 2
  try:
    arrays = forward_outputs(args.checkpoint, batch_arrays)
  except (ConfigError, CheckpointError, BatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _write_npz_atomic(pathlib.Path(args.output), arrays)
  b, t, v = arrays["logits"].shape
  print(f"wrote {args.output}: logits [{b}, {t}, {v}]")
  for name in sorted(arrays):
    if name.startswith("selected_docs"):
      print(f"  {name}: {arrays[name].tolist()}")
    elif arrays[name].ndim == 0:
      print(f"  {name}: {float(arrays[name]):.6f}")
  if args.reference:
    with np.load(args.reference) as f:
      reference = dict(f)
    valid = batch_arrays["attention_mask"].astype(bool)
    print(f"against {args.reference}:")
    for name, verdict in compare(arrays, reference, valid):
      print(f"  {name}: {verdict}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="msa-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  fwd = sub.add_parser("forward", help="training-path forward on a SPEC §13 batch")
  fwd.add_argument("--checkpoint", required=True, help="official HF checkpoint directory")
  fwd.add_argument("--batch", required=True, help="input .npz (input_ids, doc_ids, ...)")
  fwd.add_argument("--output", required=True, help="output .npz")
  fwd.add_argument("--reference", help="an .npz with outputs of the same names to compare against")
  fwd.set_defaults(run=_cmd_forward)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
