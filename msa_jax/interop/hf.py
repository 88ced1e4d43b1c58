"""The official HF checkpoint layout (SPEC §11) <-> msa-jax params, both ways.

A checkpoint directory holds `config.json` and one or more `*.safetensors` files (a sharded
checkpoint has `model.safetensors.index.json`). Torch Linear weights [out, in] become Flax
kernels [in, out] by a transpose, which is exact, so import∘export is the identity on bytes.
Tensors keep their stored dtype (float32, bfloat16 or float16; bfloat16 via ml_dtypes), so torch
is never needed.

Two config.json flavours are read and written: the official MSA one (`model_type: "msa"` with an
`msa_config`) and a plain Qwen3 one (`model_type: "qwen3"`, what transformers' `Qwen3ForCausalLM`
loads), for a dense model without router layers.

Integrity: `save_checkpoint` records a checksum of the tensors in the safetensors header
(`tensors_sha256`), and `load_checkpoint` verifies it where present and refuses NaN/Inf weights in
any checkpoint.

A checkpoint may carry its tokenizer as `tokenizer.json` (`save_checkpoint(tokenizer=...)`,
`load_tokenizer`); the byte-level models carry `data.tokenizer.byte_tokenizer_json()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import stat
import uuid
from typing import Any, Callable, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _serialize

from msa_jax import config as config_lib
from msa_jax.config import ModelConfig
# interop depends on data, never the reverse: data.tokenizer imports nothing of msa_jax.
from msa_jax.data.tokenizer import HFTokenizer, Tokenizer, tokenizer_json
from msa_jax.nn.layers import Linear
from msa_jax.nn.model import MSAForCausalLM

Params = dict[str, Any]
ModelType = Literal["msa", "qwen3"]

# Dtypes a checkpoint tensor may have (jax would silently narrow 64-bit ones).
_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_WEIGHTS = "model.safetensors"
_TOKENIZER = "tokenizer.json"
# The integrity record that save_checkpoint writes into the header's __metadata__: the digest and
# the name of its definition (`tensors_sha256`), so that a later definition can be told apart.
_SHA256_KEY = "msa_jax.sha256"
_CHECKSUM_KEY = "msa_jax.checksum"
_CHECKSUM_FORMAT = "sha256-tensors-v1"


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


# Tensors that a plain Qwen3 checkpoint lacks; msa-jax initialises them. An MSA checkpoint has them.
def _msa_only(key: str) -> bool:
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


def abstract_params(cfg: ModelConfig) -> Params:
  """The params tree of `cfg` with jax.ShapeDtypeStruct leaves (nothing is allocated)."""
  model = nnx.eval_shape(lambda: MSAForCausalLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model))


def _read_config_dict(ckpt_dir: pathlib.Path) -> dict[str, Any]:
  path = ckpt_dir / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist")
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} must hold a JSON object, got {type(d).__name__}")
  return d


def _config_from_dict(ckpt_dir: pathlib.Path, d: dict[str, Any], **kw) -> ModelConfig:
  try:
    return config_lib.from_hf_dict(d, **kw)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{ckpt_dir / 'config.json'}: {e}") from None


def read_config(ckpt_dir: str | os.PathLike, **kw) -> ModelConfig:
  """The ModelConfig of a checkpoint's config.json (`msa=` as in `config.from_hf_dict`)."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  return _config_from_dict(ckpt_dir, _read_config_dict(ckpt_dir), **kw)


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
  """The checksum that `save_checkpoint` records, as 64 lowercase hex digits.

  sha256 over every tensor in sorted name order (code points), each contributing the ASCII line
  `json.dumps([name, dtype, shape], separators=(",", ":")) + "\\n"` (dtype as numpy names it, e.g.
  "bfloat16"; shape a list of ints) followed by its raw bytes, C order, little-endian. It covers
  names, dtypes, shapes and values but not the file layout (tensor order, alignment, header), so
  it does not depend on how a writer lays the tensors out.
  """
  sha = hashlib.sha256()
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    raw = np.require(a, a.dtype.newbyteorder("<"), "C")  # a no-op on little-endian hosts
    head = json.dumps([name, raw.dtype.name, [int(n) for n in raw.shape]], separators=(",", ":"))
    sha.update(head.encode() + b"\n")
    sha.update(raw.reshape(-1).view(np.uint8))  # the line fixes the byte count: no delimiter
  return sha.hexdigest()


def _verify_checksum(f: pathlib.Path, metadata: Mapping[str, str] | None,
                     tensors: Mapping[str, np.ndarray]) -> None:
  """Checks the record of `save_checkpoint` in a file's header; a file without one passes."""
  metadata = metadata or {}
  if _SHA256_KEY not in metadata and _CHECKSUM_KEY not in metadata:
    return  # not written by save_checkpoint (e.g. an official checkpoint): nothing to verify
  fmt, want = metadata.get(_CHECKSUM_KEY), metadata.get(_SHA256_KEY)
  if fmt != _CHECKSUM_FORMAT:
    got = "missing" if fmt is None else repr(fmt[:80])
    raise CheckpointError(f"{f}: header metadata '{_CHECKSUM_KEY}' is {got}, expected "
                          f"{_CHECKSUM_FORMAT!r}; cannot verify the weights")
  if want is None:
    raise CheckpointError(f"{f}: header metadata '{_SHA256_KEY}' (the checksum) is missing")
  if not re.fullmatch(r"[0-9a-fA-F]{64}", want):
    raise CheckpointError(f"{f}: malformed checksum in header metadata '{_SHA256_KEY}': "
                          f"{want[:80]!r} is not 64 hex digits")
  if tensors_sha256(tensors) != want.lower():
    raise CheckpointError(f"{f}: checksum mismatch: the weights differ from what was saved "
                          "(file damaged)")


def check_finite(tensors: Mapping[str, Any], where: str | os.PathLike) -> None:
  """Raises CheckpointError naming a tensor of `tensors` (name -> array) that holds NaN or Inf.

  numpy arrays are counted on the host in one pass each; jax arrays on their devices, all in one
  jitted call (no gather to the host). Non-float tensors are skipped.
  """
  floats = {k: v for k, v in tensors.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  counts = {k: int(v.size - np.count_nonzero(np.isfinite(v)))
            for k, v in floats.items() if not isinstance(v, jax.Array)}
  on_device = {k: v for k, v in floats.items() if isinstance(v, jax.Array)}
  if on_device:
    counts.update({k: int(n) for k, n in jax.device_get(_count_nonfinite(on_device)).items()})
  bad = sorted(k for k, n in counts.items() if n)
  if bad:
    more = f"; {len(bad) - 1} more tensors hold some too" if len(bad) > 1 else ""
    raise CheckpointError(f"{where}: tensor '{bad[0]}' holds {counts[bad[0]]} non-finite values "
                          f"(NaN/Inf){more}")


@jax.jit
def _count_nonfinite(tensors: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: jnp.count_nonzero(~jnp.isfinite(v)) for k, v in tensors.items()}


def _read_tensors(ckpt_dir: pathlib.Path) -> dict[str, np.ndarray]:
  files = sorted(ckpt_dir.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"no *.safetensors file in {ckpt_dir}")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    try:
      with safe_open(f, framework="np") as g:
        metadata = g.metadata()
        part = {k: g.get_tensor(k) for k in g.keys()}
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"cannot read {f}: {e}") from None
    # Each file (shard) carries its own record, so a sharded checkpoint is verified file by file.
    _verify_checksum(f, metadata, part)
    dup = set(part) & set(tensors)
    if dup:
      raise CheckpointError(f"tensors {sorted(dup)[:3]} appear in more than one file")
    bad = {k: str(v.dtype) for k, v in part.items() if v.dtype not in _DTYPES}
    if bad:
      raise CheckpointError(f"{f}: unsupported tensor dtypes {dict(sorted(bad.items())[:3])}; "
                            f"expected one of {[str(d) for d in _DTYPES]}")
    check_finite(part, f)
    tensors.update(part)
  return tensors


def load_checkpoint(ckpt_dir: str | os.PathLike, *, msa: config_lib.MSAConfig | None = None,
                    seed: int = 0) -> tuple[ModelConfig, Params]:
  """Reads an official MSA or plain Qwen3 HF checkpoint: (config, params as a nested dict).

  Tensors keep their stored dtype. A plain Qwen3 checkpoint (`model_type: "qwen3"`) may be given
  router layers with `msa=MSAConfig(router_layers=...)`; its router projections are then
  initialised from `seed` (in the dtype of the stored embedding) and `temperature` from the
  config. Any other missing, unexpected or mis-shaped tensor is an error, and so is a NaN/Inf
  weight or a file whose checksum (recorded by `save_checkpoint`) does not match its tensors.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  d = _read_config_dict(ckpt_dir)
  cfg = _config_from_dict(ckpt_dir, d, msa=msa)
  tensors = _read_tensors(ckpt_dir)
  params = abstract_params(cfg)
  expected = list(_tensor_map(cfg))
  plain = d["model_type"] == "qwen3"
  missing = [k for k, _, _ in expected if k not in tensors and not (plain and _msa_only(k))]
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
  if "temperature" not in tensors:  # a plain Qwen3 checkpoint
    params["temperature"] = jnp.asarray(cfg.msa.aux_temperature, jnp.float32)
  # A plain Qwen3 checkpoint given router layers: new router projections, initialised as the
  # model initialises a Linear, from a key per (seed, layer, projection).
  dtype = tensors["model.embed_tokens.weight"].dtype
  for key, path, _ in expected:
    if key not in tensors and key != "temperature":
      d_in, d_out = _get(params, path).shape
      layer, name = path[1], path[3]  # ("layers", i, "attn", name, "kernel")
      rng = jax.random.fold_in(jax.random.key(seed), layer * 2 + (name == "router_k_proj"))
      kernel = Linear(d_in, d_out, rngs=nnx.Rngs(params=rng)).kernel[...]
      _set(params, path, kernel.astype(dtype))
  return cfg, params


def hf_config_dict(cfg: ModelConfig, model_type: ModelType = "msa", *,
                   dtype: str = "float32") -> dict[str, Any]:
  """The config.json that `save_checkpoint` writes.

  "msa": the official MSA config (`config.to_hf_dict`). "qwen3": a plain Qwen3 config that
  transformers' `Qwen3ForCausalLM.from_pretrained` loads (4.x and 5.x); only for a dense model
  (no router layers), and the MSA settings, which do not change a dense model, are not written.
  """
  if model_type == "msa":
    d = config_lib.to_hf_dict(cfg)
  elif model_type == "qwen3":
    if cfg.msa.router_layers:
      raise CheckpointError(
          f"model_type='qwen3' cannot hold router layers {cfg.msa.router_layers}; export with "
          "model_type='msa' (or drop the router layers: cfg.replace(msa=MSAConfig()))")
    d = config_lib.to_hf_dict(cfg.replace(msa=config_lib.MSAConfig()))
    del d["msa_config"]
    # transformers 5 validates sliding_window as int | None; use_sliding_window=False disables it.
    d.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", sliding_window=None)
  else:
    raise ValueError(f"model_type={model_type!r}: expected 'msa' or 'qwen3'")
  d["torch_dtype"] = dtype
  return d


def _write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """A safetensors file whose bytes depend only on its contents.

  The library keeps `__metadata__` in a hash map, so with several entries their order (and the
  file's bytes) changes from process to process; the header is rewritten with sorted keys (the
  data section and its offsets are untouched; the header stays space-padded to 8 bytes).
  """
  raw = _serialize(tensors, metadata=metadata)
  n = int.from_bytes(raw[:8], "little")
  header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
  header += b" " * (-len(header) % 8)
  with open(path, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header)
    f.write(memoryview(raw)[8 + n:])


def save_checkpoint(ckpt_dir: str | os.PathLike, cfg: ModelConfig, params: Params, *,
                    model_type: ModelType = "msa", tokenizer: Tokenizer | None = None) -> None:
  """Writes the HF layout (config.json + model.safetensors); `model_type` as in `hf_config_dict`.

  "qwen3" writes no `temperature` tensor (a plain Qwen3 checkpoint has none). A `tokenizer`
  (ByteTokenizer or HFTokenizer, see `data.tokenizer.tokenizer_json`) is written as
  tokenizer.json, and its ids must fit the model's vocabulary; without one none is written. All
  files are staged as temporary files and only then renamed over any previous ones, so a failed
  export leaves a previous checkpoint intact and no temporary file behind. A directory holding other
  safetensors files (e.g. shards of a sharded checkpoint) is refused: they would be read together
  with the new weights. The header metadata records `tensors_sha256` of the weights, which
  `load_checkpoint` verifies.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  tensors = {}
  for key, path, transpose in _tensor_map(cfg):
    if model_type == "qwen3" and _msa_only(key):
      continue
    try:
      value = np.asarray(_get(params, path))
    except (KeyError, IndexError, TypeError):
      raise CheckpointError(f"params lack {'/'.join(map(str, path))}, which this config needs "
                            f"(for {key})") from None
    # np.require keeps 0-d tensors 0-d (np.ascontiguousarray would make `temperature` [1]).
    tensors[key] = np.require(value.T if transpose else value, requirements="C")
  d = hf_config_dict(cfg, model_type, dtype=str(tensors["model.embed_tokens.weight"].dtype))
  text = json.dumps(d, indent=2, sort_keys=True) + "\n"
  tok_text = None if tokenizer is None else tokenizer_json(tokenizer)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise CheckpointError(f"the tokenizer's ids reach {tokenizer.vocab_size - 1}, beyond the "
                          f"model's vocabulary of {cfg.vocab_size}")
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  stale = sorted(p.name for p in ckpt_dir.iterdir() if p.name != _WEIGHTS and (
      p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")))
  if stale:
    raise CheckpointError(f"{ckpt_dir} holds other safetensors files {stale[:3]} that would be "
                          f"read together with the new {_WEIGHTS}; remove them or pick another "
                          "directory")
  metadata = {"format": "pt", _CHECKSUM_KEY: _CHECKSUM_FORMAT, _SHA256_KEY: tensors_sha256(tensors)}
  writers = {
      _WEIGHTS: lambda p: _write_safetensors(p, tensors, metadata),
      "config.json": lambda p: pathlib.Path(p).write_text(text),
  }
  if tok_text is not None:
    writers[_TOKENIZER] = lambda p: pathlib.Path(p).write_bytes(tok_text.encode("utf-8"))
  _atomic_write_all(ckpt_dir, writers)


def load_tokenizer(ckpt_dir: str | os.PathLike) -> HFTokenizer:
  """The tokenizer a checkpoint carries: its tokenizer.json.

  ValueError naming the directory when it has none (the caller may then pass a tokenizer
  explicitly), and naming the file when that is malformed.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  path = ckpt_dir / _TOKENIZER
  if not path.is_file():
    raise ValueError(f"checkpoint {ckpt_dir} has no {_TOKENIZER}; pass its tokenizer explicitly "
                     "(ByteTokenizer() for the byte-level models)")
  return HFTokenizer(path)


def _atomic_write_all(directory: pathlib.Path, writers: dict[str, Callable[[str], Any]]) -> None:
  """Writes every file to a temporary name first, then renames them all into place.

  Files get the ordinary permissions of a new file (umask), not the 0600 that mkstemp and
  safetensors' writer use.
  """
  staged: dict[str, pathlib.Path] = {}
  try:
    for name, write in writers.items():
      tmp = directory / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
      tmp.touch(exist_ok=False)
      staged[name] = tmp
      mode = stat.S_IMODE(tmp.stat().st_mode)
      write(str(tmp))
      os.chmod(tmp, mode)
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    for name, tmp in staged.items():
      os.replace(tmp, directory / name)
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)  # the renames themselves
    finally:
      os.close(fd)
  finally:
    for tmp in staged.values():
      tmp.unlink(missing_ok=True)
