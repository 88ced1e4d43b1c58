"""A training run from a config (an `ml_collections.ConfigDict` as in experiments/configs)."""

from __future__ import annotations

import json
import os
from typing import Callable

from flax import nnx

from msa_jax.config import MSAConfig, ModelConfig
from msa_jax.data import copying
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.interop import hf
from msa_jax.nn.model import MSAForCausalLM, from_params
from msa_jax.train import averaging, batches, loop


def model_config(c) -> ModelConfig:
  return ModelConfig(**dict(c.model), msa=MSAConfig(**{**dict(c.msa),
                                                       "router_layers": tuple(c.msa.router_layers)}))


def run_config(c, cfg: ModelConfig) -> tuple[loop.RunConfig, batches.BatchSpec]:
  d = c.data
  spec = batches.BatchSpec(
      tasks=batches.TaskMix.parse(d.tasks), rows=d.rows, docs_per_example=c.phases[0]["docs_per_example"],
      doc_chars=d.doc_chars, doc_len=batches.doc_len_for(d.doc_chars, cfg.msa.pooling_size),
      answer_fraction=d.answer_fraction, top_k=cfg.msa.top_k_docs, id_digits=tuple(d.id_digits),
      seed=d.seed, split=Split.TRAIN, distractors=d.get("distractors", 0))
  copy = None
  if "copy" in c:
    fields = dict(c.copy)
    if "lookup_docs" in fields:
      fields["lookup_docs"] = tuple(fields["lookup_docs"])
    copy = copying.CopySpec(seed=d.seed, split=Split.TRAIN, **fields)
  run = loop.RunConfig(phases=tuple(loop.Phase(**dict(p)) for p in c.phases), batch=spec,
                       copy=copy, **dict(c.train))
  return run, spec


def initial_model(c) -> MSAForCausalLM:
  """The model a run starts from: `c.init_from` (an HF checkpoint directory) or a fresh init."""
  cfg = model_config(c)
  if not c.get("init_from"):
    return from_params(cfg, hf.init_params(cfg, c.init_seed))
  loaded, params = hf.load_checkpoint(c.init_from)
  if loaded != cfg:
    raise ValueError(f"init_from {c.init_from}: its config {loaded} differs from the run's {cfg}")
  return from_params(cfg, params)


def run(c, workdir: str, *, stop_after: int | None = None,
        log: Callable[[str], None] = print) -> MSAForCausalLM:
  """Trains (or resumes) and, when the run is complete, exports `<workdir>/model`."""
  model = initial_model(c)
  run_cfg, spec = run_config(c, model.cfg)
  eval_spec = batches.BatchSpec(**{**spec.__dict__, "split": Split.TEST})
  model = loop.train(model, ByteTokenizer(), run_cfg, workdir, eval_spec=eval_spec,
                     stop_after=stop_after, log=log)
  ckpts = loop.Checkpoints(os.path.join(workdir, "checkpoints"), run_cfg.keep_checkpoints)
  try:
    finished = ckpts.latest() == run_cfg.total_steps
    if finished and c.get("interpolate"):
      interpolate(model, ckpts, c.interpolate.from_step, c.interpolate.keep)
      log(f"interpolated: step {c.interpolate.from_step} + {c.interpolate.keep} x (last - it)")
  finally:
    ckpts.close()
  if finished:
    export(c, model, os.path.join(workdir, "model"))
    log(f"exported {os.path.join(workdir, 'model')}")
  return model


def interpolate(model: MSAForCausalLM, ckpts: loop.Checkpoints, from_step: int,
                keep: float) -> None:
  """Sets `model`'s weights to `w(from_step) + keep·(w - w(from_step))` (`averaging.interpolate`).

  A config's `interpolate = {from_step, keep}` applies this to the export: the last phases' gains
  with part of the erosion they cause undone.
  """
  _, params, _ = nnx.split(model, nnx.Param, ...)
  start = ckpts.restore_params(from_step, params)
  nnx.update(model, averaging.interpolate(start, params, keep))


def export(c, model: MSAForCausalLM, directory: str) -> None:
  """The HF checkpoint with its tokenizer, plus `training.json`: the memory layout the model was
  trained on."""
  hf.save_checkpoint(directory, model.cfg, nnx.to_pure_dict(nnx.state(model)),
                     tokenizer=ByteTokenizer())
  info = {"data": {"doc_chars": c.data.doc_chars,
                   "docs_per_example": c.phases[-1]["docs_per_example"],
                   "examples_per_memory": c.data.rows, "id_digits": list(c.data.id_digits),
                   "tasks": c.data.tasks},
          "phases": [dict(p) for p in c.phases], "init_seed": c.init_seed,
          "init_from": c.get("init_from"),
          "interpolate": dict(c.interpolate) if c.get("interpolate") else None,
          "copy": dict(c.copy) if "copy" in c else None}
  tmp = os.path.join(directory, ".training.json.tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(directory, "training.json"))
