"""The training loop: a jitted AdamW step, a phase schedule, Orbax checkpoints with exact resume.

Resume is exact because nothing in a run depends on hidden iterator or RNG state: batch `s` is a
pure function of (seed, s) (`batches.build`), the optimizer state holds the schedule's step count,
and checkpoints store (params, optimizer state) at a step boundary. A run killed at any point
continues from its last checkpoint and reproduces the uninterrupted run's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from msa_jax.data import copying
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.nn.model import MSAForCausalLM
from msa_jax.train import batches
from msa_jax.train.forward import LossWeights, MemoryBatch, Metrics, loss_and_metrics


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with one loss weighting, peak learning rate and memory size.

  Fields after docs_per_example have defaults; pass them by keyword.

  The paper's schedule is a router warm-up (`0.1·LM + aux`) followed by the main phase
  (`LM + 0.1·aux`); a curriculum over memory size is a sequence of phases with growing
  `docs_per_example`.
  """

  steps: int
  lr: float
  lm_weight: float
  aux_weight: float
  docs_per_example: int
  answer_weight: float = 0.0  # SPEC §7's answer loss (the LM loss already covers answers)
  doc_weight: float = 0.0  # LM loss on each document's closing [id] (`render.closing_id_labels`)
  label_restated: bool = False  # also label the injected restated question
  warmup: int = 0  # linear warm-up steps at the start of the phase
  decay_to: float = 1.0  # cosine decay to lr·decay_to by the end of the phase
  # Every copy_every-th step trains on a dense copy batch (`RunConfig.copy`) with the LM loss
  # alone instead of a memory batch: 1 = a copy-only stage, 0 = none.
  copy_every: int = 0
  # This phase's share of LOOKUP copy batches (None: `RunConfig.copy.lookup_fraction`), so that
  # a later phase can shift the copy stream without changing the batches of earlier phases.
  lookup_fraction: float | None = None
  # This phase's share of multi-hop LOOKUP rows (None: `RunConfig.copy.hop_fraction`).
  hop_fraction: float | None = None
  # Overrides of the memory batches' `BatchSpec.distractors` / `answer_fraction` (None: the run's)
  # and of their task mix ("niah_single_1:2,bridge:1"; None: the run's).
  distractors: int | None = None
  answer_fraction: float | None = None
  tasks: str | None = None
  same_task: bool | None = None  # override of `BatchSpec.same_task`
  first_route_round: int | None = None  # override of `BatchSpec.first_route_round`
  # Update only the router's own query/key projections: routing is trained while copying, which
  # the backbone holds and full updates erode, stays as it is.
  router_only: bool = False
  # Smooth routing's max reductions over routing tokens and chunks into log-mean-exps with this
  # τ (cosine units; 0 = the exact max of inference). With the exact max, features that every
  # needle shares (the question's template words, read before its key) win the max for every
  # needle document and take all the gradient, so key matching may never form
  # (BUILD_NOTES.md "routing's max reductions"). Held-out metrics always use the exact max.
  route_softness: float = 0.0

  def is_copy_step(self, step: int) -> bool:
    return self.copy_every > 0 and step % self.copy_every == 0

  def copy_spec(self, base: copying.CopySpec) -> copying.CopySpec:
    overrides = {k: v for k, v in (("lookup_fraction", self.lookup_fraction),
                                   ("hop_fraction", self.hop_fraction)) if v is not None}
    return dataclasses.replace(base, **overrides)

  def batch_spec(self, base: batches.BatchSpec) -> batches.BatchSpec:
    """This phase's memory batches: `base` with its memory size, labels and overrides."""
    overrides = {k: v for k, v in (("distractors", self.distractors),
                                   ("answer_fraction", self.answer_fraction),
                                   ("same_task", self.same_task),
                                   ("first_route_round", self.first_route_round)) if v is not None}
    if self.tasks is not None:
      overrides["tasks"] = batches.TaskMix.parse(self.tasks)
    return dataclasses.replace(base, docs_per_example=self.docs_per_example,
                               doc_labels=self.doc_weight > 0,
                               label_restated=self.label_restated, **overrides)

  def loss_weights(self) -> LossWeights:
    """The weights of this phase's memory batches (copy batches use the LM loss alone)."""
    return LossWeights.of(self.lm_weight, self.aux_weight, self.answer_weight, self.doc_weight,
                          self.route_softness)


def schedule(phases: Sequence[Phase]) -> optax.Schedule:
  """The learning rate over all phases (optax counts optimizer updates)."""
  parts, bounds, t = [], [], 0
  for p in phases:
    decay = optax.cosine_decay_schedule(p.lr, max(1, p.steps - p.warmup), alpha=p.decay_to)
    part = (optax.join_schedules([optax.linear_schedule(0.0, p.lr, p.warmup), decay], [p.warmup])
            if p.warmup else decay)
    parts.append(part)
    t += p.steps
    bounds.append(t)
  return optax.join_schedules(parts, bounds[:-1])


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
  t = 0
  for p in phases:
    t += p.steps
    if step < t:
      return p
  return phases[-1]


def optimizer(phases: Sequence[Phase], *, clip_norm: float = 1.0, weight_decay: float = 0.01,
              accumulate: int = 1) -> optax.GradientTransformation:
  """Clipped AdamW on the phase schedule; `accumulate` > 1 sums gradients over that many batches."""
  tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                   optax.adamw(schedule(phases), b1=0.9, b2=0.95, weight_decay=weight_decay))
  return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def is_router_param(path) -> bool:
  """The parameters that only routing uses: a decoupled router's router_{q,k}_proj."""
  return any(str(getattr(k, "key", k)).startswith("router_") for k in path)


def make_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation, *,
              compute_dtype=jnp.float32) -> Callable:
  """A jitted `(params, opt_state, batch, weights) -> (params, opt_state, metrics)`.

  Master parameters stay float32; with compute_dtype=bfloat16 the forward and backward run on a
  bf16 copy (logits, softmaxes, pooling and losses still accumulate in float32).
  """

  def loss_fn(params, batch, weights):
    p = _cast(params, compute_dtype) if compute_dtype != jnp.float32 else params
    return loss_and_metrics(graphdef, (p, rest), batch, weights)

  @functools.partial(jax.jit, static_argnames="router_only")
  def step(params, opt_state, batch: MemoryBatch, weights: LossWeights, router_only: bool = False):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    if router_only:
      updates = jax.tree_util.tree_map_with_path(
          lambda path, u: u if is_router_param(path) else jnp.zeros_like(u), updates)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def make_eval(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  @jax.jit
  def evaluate(params, batch: MemoryBatch, weights: LossWeights) -> Metrics:
    return loss_and_metrics(graphdef, (params, rest), batch, weights)[1]
  return evaluate


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything besides the model that decides a run."""

  phases: tuple[Phase, ...]
  batch: batches.BatchSpec  # docs_per_example is overridden by each phase
  copy: copying.CopySpec | None = None  # the copy batches of phases with copy_every > 0
  clip_norm: float = 1.0
  weight_decay: float = 0.01
  accumulate: int = 1
  bf16: bool = False
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 2
  checkpoint_every: int = 50
  keep_checkpoints: int = 2

  def __post_init__(self):
    if self.copy is None and any(p.copy_every for p in self.phases):
      raise ValueError("phases with copy_every > 0 need RunConfig.copy")

  @property
  def total_steps(self) -> int:
    return sum(p.steps for p in self.phases) * self.accumulate


class Checkpoints:
  """Orbax `CheckpointManager` over (params, opt_state) as plain pytrees, saved synchronously."""

  def __init__(self, directory: str, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state) -> None:
    self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                    opt_state=ocp.args.StandardSave(opt_state)))
    self.manager.wait_until_finished()

  def restore(self, step: int, params, opt_state):
    abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state))))
    return out["params"], out["opt_state"]

  def restore_params(self, step: int, params):
    """The parameters saved at `step` (shaped like `params`), without the optimizer state."""
    if step not in self.manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} (have {sorted(self.manager.all_steps())})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))
    return out["params"]

  def close(self):
    self.manager.close()


def _scalars(m: Metrics) -> dict[str, float]:
  return {f.name: float(getattr(m, f.name)) for f in dataclasses.fields(m)}


def train(model: MSAForCausalLM, tok: Tokenizer, run: RunConfig, workdir: str, *,
          eval_spec: batches.BatchSpec | None = None, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> MSAForCausalLM:
  """Trains `model` in place of a copy and returns the trained model.

  workdir gets `checkpoints/` (Orbax), `metrics.jsonl` (one JSON object per logged step; eval
  rows have "split": "test") and TensorBoard event files under `tb/`. If checkpoints exist, the
  run resumes from the latest one. stop_after: return after that many optimizer-step calls
  in this invocation (for tests of interruption).
  """
  from tensorboardX import SummaryWriter

  os.makedirs(workdir, exist_ok=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if any(p.router_only for p in run.phases) and not any(
      is_router_param(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]):
    raise ValueError("a router_only phase needs router projections of their own "
                     "(MSAConfig.decouple_router); this model routes with its attention's q/k")
  tx = optimizer(run.phases, clip_norm=run.clip_norm, weight_decay=run.weight_decay,
                 accumulate=run.accumulate)
  opt_state = tx.init(params)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
  start = 0
  if (latest := ckpt.latest()) is not None:
    params, opt_state = ckpt.restore(latest, params, opt_state)
    start = latest
    log(f"resumed from step {latest}")
  step_fn = make_step(graphdef, rest, tx, compute_dtype=jnp.bfloat16 if run.bf16 else jnp.float32)
  eval_fn = make_eval(graphdef, rest)
  writer = SummaryWriter(os.path.join(workdir, "tb"))
  sched = schedule(run.phases)
  total = run.total_steps
  t_last, tokens_since, rows_since, calls = time.time(), 0.0, 0, 0
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as out:
    for s in range(start, total):
      update = s // run.accumulate
      phase = phase_at(run.phases, update)
      copy_step = phase.is_copy_step(update)
      copy_spec = phase.copy_spec(run.copy) if copy_step else None
      if copy_step:
        batch = batches.build_copy(tok, copy_spec, s, top_k=run.batch.top_k,
                                   pooling_size=model.cfg.msa.pooling_size)
        weights = LossWeights.of(1.0, 0.0)
        rows = batch.input_ids.shape[0]
      else:
        spec = phase.batch_spec(run.batch)
        batch, _ = batches.build(tok, spec, s)
        weights = phase.loss_weights()
        rows = spec.rows
      params, opt_state, metrics = step_fn(params, opt_state, batch, weights,
                                           router_only=phase.router_only)
      calls += 1
      tokens_since += float(batch.mask.sum()) + float(batch.doc_lengths.sum())
      rows_since += rows
      done = s + 1
      if done % run.log_every == 0 or done == total:
        dt = time.time() - t_last
        kind = copying.batch_kind(copy_spec, s).value if copy_step else None
        row = {"step": done, "split": "train", "batch": "copy" if copy_step else "memory",
               "copy_kind": kind,
               "lr": float(sched(update)),
               "docs_per_example": phase.docs_per_example, "tokens_per_s": tokens_since / dt,
               "rows_per_s": rows_since / dt, "time": time.time(), **_scalars(metrics)}
        out.write(json.dumps(row) + "\n")
        out.flush()
        for k, v in row.items():
          if isinstance(v, float) and k != "time":
            writer.add_scalar(f"train/{k}", v, done)
        log(f"step {done}/{total} {row['batch']} loss {row['loss']:.4f} lm {row['lm_loss']:.4f} "
            f"aux {row['aux_loss']:.4f} recall {row['recall']:.3f} top1 {row['top1']:.3f} exact {row['exact']:.3f} "
            f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s")
        t_last, tokens_since, rows_since = time.time(), 0.0, 0
      if eval_spec is not None and (done % run.eval_every == 0 or done == total):
        es = phase.batch_spec(eval_spec)
        # The phase's memory weights, not the last step's (which may have been a copy step), with
        # the exact routing of inference.
        held_out = dataclasses.replace(phase, route_softness=0.0).loss_weights()
        ms = [_scalars(eval_fn(params, batches.build(tok, es, i)[0], held_out))
              for i in range(run.eval_batches)]
        row = {"step": done, "split": "test",
               **{k: float(np.mean([m[k] for m in ms])) for k in ms[0]}}
        if run.copy is not None:
          cs = dataclasses.replace(run.copy, split=eval_spec.split)
          kinds = [("span", 0.0, 0.0), ("lookup", 1.0, 0.0)]
          if run.copy.hop_fraction > 0 or any(p.hop_fraction for p in run.phases):
            kinds.append(("hop", 1.0, 1.0))  # multi-hop LOOKUP rows only
          for kind, fraction, hops in kinds:
            m = _scalars(eval_fn(params, batches.build_copy(
                tok, dataclasses.replace(cs, lookup_fraction=fraction, hop_fraction=hops), 0,
                top_k=run.batch.top_k, pooling_size=model.cfg.msa.pooling_size),
                LossWeights.of(1.0, 0.0)))
            row[f"copy_{kind}_accuracy"] = m["token_accuracy"]
            if kind == "hop":  # every labelled token right: the restated question and the answer
              row["copy_hop_exact"] = m["exact"]
        out.write(json.dumps(row) + "\n")
        out.flush()
        for k, v in row.items():
          if isinstance(v, float):
            writer.add_scalar(f"test/{k}", v, done)
        log(f"  eval step {done}: lm {row['lm_loss']:.4f} recall {row['recall']:.3f} top1 {row['top1']:.3f} "
            f"token_acc {row['token_accuracy']:.3f} exact {row['exact']:.3f}"
            + "".join(f" {k} {row[k]:.3f}" for k in row if k.startswith("copy_")))
      if done % run.checkpoint_every == 0 or done == total:
        ckpt.save(done, params, opt_state)
      if stop_after is not None and calls >= stop_after:
        break
  writer.close()
  ckpt.close()
  nnx.update(model, params)
  return model
