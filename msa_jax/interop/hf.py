"""The official HF checkpoint layout (SPEC §11) <-> msa-jax params, both ways.

A checkpoint directory holds `config.json` and one or more `*.safetensors` files (a sharded
checkpoint has `model.safetensors.index.json`). Torch Linear weights [out, in] become Flax
kernels [in, out] by a transpose, which is exact, so import∘export is the identity on bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from msa_jax import config as config_lib
from msa_jax.config import ModelConfig
from msa_jax.nn.model import MSAForCausalLM

Params = dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint that does not match what its config.json describes."""


def _tensor_map(cfg: ModelConfig) -> Iterator[tuple[str, tuple, bool]]:
  """(official key, params path, transpose?) for every tensor of `cfg`."""
  yield "model.embed_tokens.weight", ("embed", "embedding"), False
  yield "model.norm.weight", ("final_norm", "scale"), False
  if not cfg.tie_word_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), True
  yield "temperature", ("temperature",), False
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", ("layers", i, "input_norm", "scale"), False
    yield p + "post_attention_layernorm.weight", ("layers", i, "post_attn_norm", "scale"), False
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      yield p + f"self_attn.{name}.weight", ("layers", i, "attn", name, "kernel"), True
    for name in ("q_norm", "k_norm"):
      yield p + f"self_attn.{name}.weight", ("layers", i, "attn", name, "scale"), False
    if cfg.is_router_layer(i) and cfg.msa.decouple_router:
      for name in ("router_q_proj", "router_k_proj"):
        yield p + f"self_attn.{name}.0.weight", ("layers", i, "attn", name, "kernel"), True
    for name in ("gate_proj", "up_proj", "down_proj"):
      yield p + f"mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), True


# Tensors that a plain Qwen3 checkpoint lacks; msa-jax initialises them.
def _optional(key: str) -> bool:
  return key == "temperature" or ".router_" in key


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
  """Freshly initialised params as a plain nested dict."""
  model = MSAForCausalLM(cfg, rngs=nnx.Rngs(seed))
  return nnx.to_pure_dict(nnx.state(model))


def read_config(ckpt_dir: str | os.PathLike, **kw) -> ModelConfig:
  path = pathlib.Path(ckpt_dir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  return config_lib.from_hf_dict(d, **kw)


def _read_tensors(ckpt_dir: pathlib.Path) -> dict[str, np.ndarray]:
  files = sorted(ckpt_dir.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"no *.safetensors file in {ckpt_dir}")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    try:
      part = load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"cannot read {f}: {e}") from None
    dup = set(part) & set(tensors)
    if dup:
      raise CheckpointError(f"tensors {sorted(dup)[:3]} appear in more than one file")
    tensors.update(part)
  return tensors


def load_checkpoint(ckpt_dir: str | os.PathLike, *, msa: config_lib.MSAConfig | None = None,
                    seed: int = 0) -> tuple[ModelConfig, Params]:
  """Reads an official MSA or plain Qwen3 HF checkpoint: (config, params as a nested dict).

  Tensors keep their stored dtype. Missing router projections (a plain Qwen3 checkpoint) are
  initialised from `seed`; any other missing, unexpected or mis-shaped tensor is an error.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  cfg = read_config(ckpt_dir, msa=msa)
  tensors = _read_tensors(ckpt_dir)
  params = init_params(cfg, seed)
  expected = list(_tensor_map(cfg))
  missing = [k for k, _, _ in expected if k not in tensors and not _optional(k)]
  if missing:
    raise CheckpointError(f"{ckpt_dir}: missing tensors {missing[:5]}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  unexpected = sorted(set(tensors) - {k for k, _, _ in expected})
  if unexpected:
    raise CheckpointError(f"{ckpt_dir}: unexpected tensors {unexpected[:5]} for this config.json")
  for key, path, transpose in expected:
    if key not in tensors:
      continue
    value = tensors[key]
    want = np.shape(_get(params, path))
    got = value.T.shape if transpose else value.shape
    if got != want:
      raise CheckpointError(f"{ckpt_dir}: tensor {key} has shape {value.shape}, expected "
                            f"{want[::-1] if transpose else want} for this config.json")
    _set(params, path, jnp.asarray(value.T if transpose else value))
  return cfg, params


def save_checkpoint(ckpt_dir: str | os.PathLike, cfg: ModelConfig, params: Params) -> None:
  """Writes the official HF layout (config.json + model.safetensors), atomically per file."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for key, path, transpose in _tensor_map(cfg):
    value = np.asarray(_get(params, path))
    tensors[key] = np.ascontiguousarray(value.T if transpose else value)
  _atomic_write(ckpt_dir / "model.safetensors",
                lambda p: save_file(tensors, p, metadata={"format": "pt"}))
  text = json.dumps(config_lib.to_hf_dict(cfg), indent=2, sort_keys=True) + "\n"
  _atomic_write(ckpt_dir / "config.json", lambda p: pathlib.Path(p).write_text(text))


def _atomic_write(dest: pathlib.Path, write) -> None:
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
