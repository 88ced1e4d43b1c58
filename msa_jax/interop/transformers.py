"""msa-jax models -> transformers' PyTorch `Qwen3ForCausalLM`, for parity and speed comparisons.

`dense(model)` is the same weights without router layers: with every token role -1 (no memory)
its training-path forward is plain causal attention, the computation of a Qwen3 model.
`to_transformers(model)` is that Qwen3 model in PyTorch. It goes through the plain Qwen3
checkpoint that `hf.save_checkpoint(model_type="qwen3")` writes (tested to load bit-identically),
so there is one tensor mapping only. Needs the `interop` extra (torch, transformers).
"""

from __future__ import annotations

import tempfile

import numpy as np
from flax import nnx

from msa_jax.config import MSAConfig
from msa_jax.interop import hf
from msa_jax.nn.model import MSAForCausalLM, from_params


def _params(model: MSAForCausalLM) -> hf.Params:
  return nnx.to_pure_dict(nnx.state(model))


def dense(model: MSAForCausalLM) -> MSAForCausalLM:
  """`model` without its router layers (and their router projections); other weights shared."""
  params = _params(model)
  for layer in params["layers"].values():
    for name in ("router_q_proj", "router_k_proj"):
      layer["attn"].pop(name, None)
  return from_params(model.cfg.replace(msa=MSAConfig()), params)


def to_transformers(model: MSAForCausalLM, *, attn_implementation: str = "eager"):
  """A `transformers.Qwen3ForCausalLM` (eval mode, CPU) holding `model`'s dense backbone.

  Router projections are dropped (a Qwen3 model has none); the weights keep their dtype.
  """
  import torch
  import transformers

  cfg = model.cfg.replace(msa=MSAConfig())
  params = _params(model)
  with tempfile.TemporaryDirectory(prefix="msa_jax_qwen3_") as d:
    hf.save_checkpoint(d, cfg, params, model_type="qwen3")
    torch_model = transformers.Qwen3ForCausalLM.from_pretrained(
        d, attn_implementation=attn_implementation)
  # transformers 4.x loads float32 unless told otherwise, 5.x the stored dtype: pin it.
  dtype = str(np.asarray(params["embed"]["embedding"]).dtype)  # float32, bfloat16 or float16
  return torch_model.to(getattr(torch, dtype)).eval()
