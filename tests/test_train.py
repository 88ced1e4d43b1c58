"""Training: the block-layout forward is the training path, the loss trains, batches are the spec."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from msa_jax import forward as packed
from msa_jax.config import ModelConfig, MSAConfig, RoutingScore
from msa_jax.data import niah, render
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import ByteTokenizer, Special
from msa_jax.interop import hf
from msa_jax.math import roles
from msa_jax.nn.model import from_params
from msa_jax.train import averaging, batches, evaluate, loop
from msa_jax.train.forward import LossWeights, MemoryBatch, loss_and_metrics, memory_forward

TOK = ByteTokenizer()


def small_model(decouple=True, k=2, seed=0):
  cfg = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                    msa=MSAConfig(top_k_docs=k, pooling_size=4, router_layers=(1, 2),
                                  decouple_router=decouple,
                                  routing_score=RoutingScore.COSINE if decouple
                                  else RoutingScore.SCALED_COSINE))
  params = hf.init_params(cfg, seed)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, np.shape(p)), jnp.float32)
                        if np.ndim(p) >= 1 else p, params)
  return from_params(cfg, params)


def random_memory_batch(lengths, active_roles, *, shared=False, seed=0, width=12):
  """lengths [Bd, M] (0 = empty slot), active roles [B, A] (None = padding)."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  b, a = len(active_roles), max(len(r) for r in active_roles)
  mask = np.array([[1] * len(r) + [0] * (a - len(r)) for r in active_roles])
  role = np.array([list(r) + [-1] * (a - len(r)) for r in active_roles])
  labels = np.where((role == roles.ACTIVE) & (mask > 0), rng.integers(1, 200, (b, a)), -100)
  m = lengths.shape[1]
  aux = np.zeros((b, m), int)
  for r in range(b):
    present = np.flatnonzero(np.broadcast_to(lengths, (b, m))[r] > 0)
    aux[r, rng.choice(present)] = 1
  aux[np.broadcast_to(lengths, (b, m)) == 0] = -1
  return MemoryBatch.from_arrays(dict(
      doc_tokens=rng.integers(1, 200, (lengths.shape[0], m, width)), doc_lengths=lengths,
      input_ids=rng.integers(1, 200, (b, a)), roles=role, mask=mask,
      positions=np.arange(a)[None].repeat(b, 0) + 3, labels=labels, aux_labels=aux))


CASES = {
    # partial chunks, a one-token document, an empty trailing slot, padding in the active part
    "awkward": ([[1, 4, 5, 9, 0], [3, 12, 2, 7, 0]], [[0, 0, 0, -1, -1, -1, -1], [0, 0, -1, -1, -2]]),
    "one_document": ([[6]], [[0, 0, -1, -1]]),
    "k_exceeds_documents": ([[3, 2]], [[0, -1, -1, -1], [0, 0, 0, -1]]),  # k=3 > 2 documents
    "shared_memory": ([[5, 8, 1, 12]], [[0, 0, -1, -1], [0, -1, -1, -1], [-2, 0, 0, -1]]),
}


@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_forward_equals_the_packed_training_forward(case, decouple):
  lengths, active = CASES[case]
  model = small_model(decouple, k=3 if case == "k_exceeds_documents" else 2)
  batch = random_memory_batch(lengths, active, seed=len(case))
  gd, st = nnx.split(model)
  logits, routed = memory_forward(gd, st, batch)
  ref = packed.run(model, batch.to_packed())
  mask = np.asarray(batch.mask)
  pmask = np.asarray(ref.logits.shape)
  for r in range(mask.shape[0]):
    n, total = mask[r].sum(), int(np.asarray(batch.to_packed().attention_mask)[r].sum())
    np.testing.assert_allclose(np.asarray(logits)[r, :n], np.asarray(ref.logits)[r, total - n:total],
                               atol=2e-5, rtol=0)
  for l, r in routed.items():
    width = ref.doc_scores[l].shape[1]
    np.testing.assert_allclose(np.asarray(r.doc_scores)[:, :width], np.asarray(ref.doc_scores[l]),
                               atol=1e-5)
    assert np.all(np.isneginf(np.asarray(r.doc_scores)[:, width:]))
    np.testing.assert_array_equal(np.asarray(r.selected), np.asarray(ref.selected[l]))
  del pmask


def test_top1_is_the_share_of_rows_whose_best_scored_document_is_gold():
  lengths, active = CASES["shared_memory"]
  model = small_model(k=3)
  batch = random_memory_batch(lengths, active, seed=5)
  gd, st = nnx.split(model)
  _, routed = memory_forward(gd, st, batch)
  aux = np.asarray(batch.aux_labels)
  def top1(aux):
    # NumPy reference: per router layer, argmax of the document scores (slot 0 is no document).
    return np.mean([np.mean(aux[np.arange(len(aux)), np.argmax(np.asarray(r.doc_scores)[:, 1:], axis=1)] > 0)
                    for r in routed.values()])
  _, metrics = loss_and_metrics(gd, st, batch, LossWeights.of(1.0, 1.0))
  np.testing.assert_allclose(float(metrics.top1), top1(aux), atol=1e-6)
  # Labelling each row's best document (by the first router layer) gold raises it.
  best = np.argmax(np.asarray(next(iter(routed.values())).doc_scores)[:, 1:], axis=1)
  relabelled = np.where(aux >= 0, 0, aux)
  relabelled[np.arange(len(aux)), best] = 1
  _, metrics = loss_and_metrics(gd, st, batch.replace(aux_labels=jnp.asarray(relabelled)),
                                LossWeights.of(1.0, 1.0))
  np.testing.assert_allclose(float(metrics.top1), top1(relabelled), atol=1e-6)
  assert float(metrics.top1) >= 0.5 and top1(relabelled) > top1(aux) - 1e-9


def test_block_loss_equals_the_packed_losses():
  lengths, active = CASES["awkward"]
  model = small_model()
  batch = random_memory_batch(lengths, active, seed=3)
  gd, st = nnx.split(model)
  m = model.cfg.msa
  loss, metrics = loss_and_metrics(gd, st, batch, LossWeights.of(m.lm_weight, m.aux_weight))
  ref = packed.run(model, batch.to_packed()).losses
  np.testing.assert_allclose(float(metrics.lm_loss), float(ref.lm_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics.aux_loss), float(ref.aux_loss), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref.loss), rtol=1e-5)
  # The answer loss is the LM loss restricted to the answer labels.
  labels = np.asarray(batch.labels)
  answer = np.where(np.arange(labels.shape[1]) >= 5, labels, -100)
  with_answer = batch.replace(answer_labels=jnp.asarray(answer))
  total, m2 = loss_and_metrics(gd, st, with_answer, LossWeights.of(0.0, 0.0, 1.0))
  only = batch.replace(labels=jnp.asarray(answer))
  _, m3 = loss_and_metrics(gd, st, only, LossWeights.of(1.0, 0.0))
  np.testing.assert_allclose(float(total), float(m3.lm_loss), rtol=1e-6)
  assert float(m2.answer_loss) > 0


def _infonce64(scores, positive, tau):
  s = np.asarray(scores, np.float64)
  present = np.isfinite(s)
  z = np.where(present, s / tau, -np.inf)
  logp = z - np.log(np.sum(np.exp(z[present] - z[present].max()))) - z[present].max()
  return -np.sum(logp[positive & present]) / max(1, np.sum(positive & present))


def test_aux_loss_matches_float64_and_rises_when_the_positive_scores_lower():
  lengths, active = [[4, 9, 7, 3, 5]], [[0, 0, 0, -1, -1]]
  model = small_model()
  batch = random_memory_batch(lengths, active, seed=5)
  gd, st = nnx.split(model)
  w = LossWeights.of(0.0, 1.0)
  _, routed = memory_forward(gd, st, batch)
  tau = float(model.temperature[...])
  scores = {l: np.asarray(r.doc_scores)[0, 1:] for l, r in routed.items()}
  layers = model.cfg.aux_loss_layers
  losses = {}
  for name, pick in (("best", np.argmax), ("worst", np.argmin)):
    pos = pick(np.mean([scores[l] for l in layers], axis=0))
    aux = np.zeros((1, 5), int)
    aux[0, pos] = 1
    b = batch.replace(aux_labels=jnp.asarray(aux))
    _, metrics = loss_and_metrics(gd, st, b, w)
    want = np.mean([_infonce64(scores[l], aux[0] > 0, tau) for l in layers])
    np.testing.assert_allclose(float(metrics.aux_loss), want, rtol=1e-5)
    losses[name] = float(metrics.aux_loss)
  assert losses["worst"] > losses["best"]


def test_a_document_labelled_minus_one_is_left_out_of_the_contrast():
  # At a second retrieval round the first round's document is pasted in the query: it is
  # neither a positive nor a negative of that row (float64 InfoNCE over the other documents).
  lengths, active = [[4, 9, 7, 3, 5]], [[0, 0, 0, -1, -1]]
  model = small_model()
  batch = random_memory_batch(lengths, active, seed=6)
  gd, st = nnx.split(model)
  w = LossWeights.of(0.0, 1.0)
  _, routed = memory_forward(gd, st, batch)
  tau = float(model.temperature[...])
  layers = model.cfg.aux_loss_layers
  scores = {l: np.asarray(r.doc_scores)[0, 1:] for l, r in routed.items()}
  order = np.argsort(-scores[min(scores)])  # by the first router layer
  aux = np.zeros((1, 5), int)
  aux[0, order[1]] = 1
  aux[0, order[0]] = -1  # the best-scored document: the hardest negative if it were one
  _, left_out = loss_and_metrics(gd, st, batch.replace(aux_labels=jnp.asarray(aux)), w)
  keep = aux[0] >= 0
  want = np.mean([_infonce64(np.where(keep, scores[l], -np.inf), aux[0] > 0, tau) for l in layers])
  np.testing.assert_allclose(float(left_out.aux_loss), want, rtol=1e-5)
  _, negative = loss_and_metrics(gd, st, batch.replace(aux_labels=jnp.asarray(np.maximum(aux, 0))), w)
  assert float(negative.aux_loss) > float(left_out.aux_loss) + 1e-3
  # top1 skips it too: per router layer, is the best-scored document not left out the gold one?
  def top1(labels):
    return np.mean([labels[np.argmax(np.where(labels >= 0, s, -np.inf))] > 0 for s in scores.values()])
  np.testing.assert_allclose(float(left_out.top1), top1(aux[0]), atol=1e-6)
  np.testing.assert_allclose(float(negative.top1), top1(np.maximum(aux[0], 0)), atol=1e-6)
  assert top1(aux[0]) > top1(np.maximum(aux[0], 0))


def test_a_second_round_route_row_leaves_the_first_rounds_documents_out():
  spec = dataclasses.replace(SPEC, tasks=batches.TaskMix.parse("bridge,chain_2,chain_3"),
                             answer_fraction=0.0, rows=6, doc_chars=160,
                             doc_len=batches.doc_len_for(160, 8))
  later_rounds = 0
  for step in range(4):
    batch, info = batches.build(TOK, spec, step)
    docs = [TOK.decode(np.asarray(batch.doc_tokens)[0, j, :n])
            for j, n in enumerate(np.asarray(batch.doc_lengths)[0])]
    ids = [int(d[len("<|im_start|>["):d.index("]")]) for d in docs]
    aux = np.asarray(batch.aux_labels)
    for r in range(spec.rows):
      n = int(np.asarray(batch.mask)[r].sum())
      text = TOK.decode(np.asarray(batch.input_ids)[r, :n])
      pasted = {i for i in ids if f"[{i}]. " in text}
      assert {ids[j] for j in np.flatnonzero(aux[r] < 0)} == pasted
      assert np.sum(aux[r] > 0) >= 1 and not pasted & {ids[j] for j in np.flatnonzero(aux[r] > 0)}
      later_rounds += bool(pasted)
  assert later_rounds > 0


def test_first_route_round_trains_later_rounds_only_where_an_example_has_them():
  spec = dataclasses.replace(SPEC, tasks=batches.TaskMix.parse("chain_3,niah_single_1"),
                             answer_fraction=0.0, rows=6, doc_chars=160,
                             doc_len=batches.doc_len_for(160, 8), first_route_round=1)
  rounds_seen = set()
  for step in range(6):
    batch, info = batches.build(TOK, spec, step)
    aux = np.asarray(batch.aux_labels)
    for r, task in enumerate(info["tasks"]):
      done = int(np.sum(aux[r] < 0))  # chain docs pasted = rounds already retrieved
      if task == "chain_3":
        assert done in (1, 2)
        rounds_seen.add(done)
      else:  # NIAH has one round: its only route row, unchanged
        assert done == 0 and np.sum(aux[r] > 0) >= 1
  assert rounds_seen == {1, 2}
  # A phase may set it for its own batches only.
  phase = loop.Phase(steps=1, lr=1e-3, lm_weight=1.0, aux_weight=1.0, docs_per_example=3,
                     first_route_round=2)
  assert phase.batch_spec(SPEC).first_route_round == 2
  assert dataclasses.replace(phase, first_route_round=None).batch_spec(SPEC).first_route_round == 0


def _gold_rank64(scores_by_layer, aux_row):
  """Float64 reference: sort the non-left-out documents by score (gold first among equals) and
  take the first gold position; the best layer's."""
  best = None
  for scores in scores_by_layer:
    kept = [(-float(s), 0 if a > 0 else 1, a) for s, a in zip(scores, aux_row) if a >= 0]
    kept.sort(key=lambda t: (t[0], t[1]))
    pos = next(i for i, t in enumerate(kept) if t[2] > 0)
    best = pos if best is None else min(best, pos)
  return best


def test_gold_ranks_count_the_documents_above_the_best_gold_skipping_left_out_ones():
  rng = np.random.default_rng(0)
  b, m = 7, 9
  aux = np.zeros((b, m), np.int32)
  for r in range(b):
    aux[r, rng.choice(m, size=1 + r % 3, replace=False)] = 1
    others = np.flatnonzero(aux[r] == 0)
    aux[r, rng.choice(others, size=r % 2 + (r == 3) * 2, replace=False)] = -1
  # Coarse scores make ties; the left-out documents score highest, as a pasted document does.
  layers = {2: np.round(rng.random((b, m)), 1), 3: np.round(rng.random((b, m)), 1)}
  for sc in layers.values():
    sc[aux < 0] = 2.0
  got = evaluate.gold_ranks(layers, aux)
  want = [_gold_rank64([layers[2][r], layers[3][r]], aux[r]) for r in range(b)]
  np.testing.assert_array_equal(got, want)
  assert evaluate.gold_ranks({2: np.array([[0.9, 0.5, 0.1]])}, np.array([[0, 0, 1]])) == 2


def test_a_few_adamw_steps_reduce_the_loss_on_a_fixed_batch():
  model = small_model()
  batch = random_memory_batch(*CASES["awkward"], seed=7)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  tx = loop.optimizer([loop.Phase(steps=20, lr=3e-3, lm_weight=1.0, aux_weight=1.0,
                                  docs_per_example=1)])
  step = loop.make_step(gd, rest, tx)
  opt_state = tx.init(params)
  w = LossWeights.of(1.0, 1.0)
  first = None
  for _ in range(20):
    params, opt_state, metrics = step(params, opt_state, batch, w)
    first = float(metrics.loss) if first is None else first
  _, final = loss_and_metrics(gd, (params, rest), batch, w)
  assert float(final.loss) < 0.7 * first
  assert float(final.aux_loss) < float(loss_and_metrics(gd, nnx.split(model)[1], batch, w)[1].aux_loss)


def test_a_router_only_step_moves_the_router_projections_and_nothing_else():
  lengths, active = CASES["awkward"]
  batch = random_memory_batch(lengths, active, seed=2)
  model = small_model()
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  phases = [loop.Phase(steps=4, lr=1e-2, lm_weight=1.0, aux_weight=1.0, docs_per_example=2)]
  tx = loop.optimizer(phases)
  step = loop.make_step(gd, rest, tx)
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  router = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if loop.is_router_param(p)}
  assert router and all("router_" in k for k in router)
  before = flat(params)
  for router_only in (True, False):
    new, _, _ = step(params, tx.init(params), batch, LossWeights.of(1.0, 1.0),
                     router_only=router_only)
    after = flat(new)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    if router_only:
      assert moved == router
    else:  # a full step moves the backbone too
      assert router < moved


def test_interpolation_is_the_float64_line_between_two_weight_trees():
  rng = np.random.default_rng(0)
  start = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": {"c": rng.normal(size=(7,))
                                                                  .astype(np.float32)}}
  end = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), start)
  for keep in (0.0, 0.3, 1.0):
    got = averaging.interpolate(start, end, keep)
    want = jax.tree.map(lambda a, b: a.astype(np.float64) + keep * (b.astype(np.float64) - a),
                        start, end)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == np.float32
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=1e-6)
  half = averaging.interpolate({"w": jnp.ones(4, jnp.bfloat16)}, {"w": jnp.full(4, 3, jnp.bfloat16)},
                               0.5)
  assert half["w"].dtype == jnp.bfloat16 and np.all(np.asarray(half["w"], np.float32) == 2)


@pytest.mark.parametrize("start, end, keep, match", [
    ({"a": np.zeros(2, np.float32)}, {"a": np.zeros(2, np.float32)}, 1.5, "keep must lie"),
    ({"a": np.zeros(2, np.float32)}, {"a": np.zeros(2, np.float32)}, float("nan"), "keep must lie"),
    ({"a": np.zeros(2, np.float32)}, {"b": np.zeros(2, np.float32)}, 0.5, "structure"),
    ({"a": np.zeros(2, np.float32)}, {"a": np.zeros(3, np.float32)}, 0.5, r"\['a'\]"),
    ({"a": np.zeros(2, np.float32)}, {"a": np.zeros(2, np.float16)}, 0.5, "float16"),
    ({"a": np.zeros(2, np.int32)}, {"a": np.ones(2, np.int32)}, 0.5, "cannot interpolate"),
])
def test_interpolation_refuses_mismatched_trees_and_weights(start, end, keep, match):
  with pytest.raises(ValueError, match=match):
    averaging.interpolate(start, end, keep)


def test_schedule_follows_the_phases():
  phases = [loop.Phase(steps=10, lr=1e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2,
                       warmup=4),
            loop.Phase(steps=10, lr=5e-4, lm_weight=1.0, aux_weight=0.1, docs_per_example=3,
                       decay_to=0.1)]
  s = loop.schedule(phases)
  np.testing.assert_allclose([float(s(0)), float(s(2)), float(s(4))], [0.0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(20)), 5e-5, rtol=1e-5)
  assert loop.phase_at(phases, 9).docs_per_example == 2
  assert loop.phase_at(phases, 10).aux_weight == 0.1


# --- batches ------------------------------------------------------------------------------------

SPEC = batches.BatchSpec(tasks=batches.TaskMix.parse("niah_single_1,niah_multivalue,niah_multiquery"),
                         rows=4, docs_per_example=3, doc_chars=120,
                         doc_len=batches.doc_len_for(120, 8), top_k=4, seed=3)


def test_batches_are_a_pure_function_of_the_step():
  a, info_a = batches.build(TOK, SPEC, 5)
  b, info_b = batches.build(TOK, SPEC, 5)
  c, _ = batches.build(TOK, SPEC, 6)
  assert info_a == info_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.doc_tokens), np.asarray(c.doc_tokens))


@pytest.mark.parametrize("step", range(6))
def test_a_batch_row_is_one_retrieval_step_in_the_msa_format(step):
  batch, info = batches.build(TOK, SPEC, step)
  docs = [TOK.decode(np.asarray(batch.doc_tokens)[0, j, :n])
          for j, n in enumerate(np.asarray(batch.doc_lengths)[0])]
  for d in docs:
    assert d.startswith("<|im_start|>[") and d.endswith("]<|im_end|>")
  ids = [int(d[len("<|im_start|>["):d.index("]")]) for d in docs]
  assert len(set(ids)) == len(ids)
  for r, kind in enumerate(info["kinds"]):
    n = int(np.asarray(batch.mask)[r].sum())
    text = TOK.decode(np.asarray(batch.input_ids)[r, :n])
    labels = np.asarray(batch.labels)[r, :n]
    target = TOK.decode(labels[labels >= 0])
    gold = [ids[j] for j in np.flatnonzero(np.asarray(batch.aux_labels)[r] > 0)]
    if kind == "route":
      # The target is the gold documents' ids and the delimiter; nothing else is labelled.
      assert target == render.ids_text(gold)
      assert np.all(np.asarray(batch.answer_labels)[r] < 0)
      assert text.endswith(target)
    else:
      assert target.startswith("<End-of-Retrieve>The answer to the question is: ")
      assert target.endswith("<|im_end|>")
      for i in gold:  # every gold document's text was appended
        assert f"[{i}]. " in text
      # the answer values are in the appended text
      answer_labels = np.asarray(batch.answer_labels)[r, :n]
      assert "<End-of-Retrieve>" + TOK.decode(answer_labels[answer_labels >= 0]) == target
      answer = target[len("<End-of-Retrieve>The answer to the question is: "):-len("<|im_end|>")]
      for value in answer.replace(", and ", ", ").split(", "):
        assert value in text
    # positions start at top_k and increase by one; question tokens route
    pos = np.asarray(batch.positions)[r, :n]
    np.testing.assert_array_equal(pos, SPEC.top_k + np.arange(n))
    assert np.asarray(batch.roles)[r, 0] == roles.QUERY


def test_same_task_batches_ask_one_task_in_every_row_and_leave_the_default_stream_alone():
  spec = dataclasses.replace(SPEC, rows=6)
  same = dataclasses.replace(spec, same_task=True)
  seen = set()
  for step in range(8):
    _, info = batches.build(TOK, same, step)
    assert len(set(info["tasks"])) == 1
    seen |= set(info["tasks"])
  assert len(seen) > 1  # the task is drawn per batch
  mixed = [set(batches.build(TOK, spec, step)[1]["tasks"]) for step in range(8)]
  assert max(len(t) for t in mixed) > 1
  # A phase may switch it on without changing the run's batches elsewhere.
  phase = loop.Phase(steps=1, lr=1e-3, lm_weight=1.0, aux_weight=1.0, docs_per_example=3,
                     same_task=True)
  assert phase.batch_spec(spec).same_task and not spec.same_task


def test_train_and_test_batches_do_not_share_needles():
  test_spec = dataclasses.replace(SPEC, split=Split.TEST)
  def needles(spec):
    out = set()
    for s in range(4):
      b, _ = batches.build(TOK, spec, s)
      for j, n in enumerate(np.asarray(b.doc_lengths)[0]):
        text = TOK.decode(np.asarray(b.doc_tokens)[0, j, :n])
        out |= {part.split(" is: ")[1][:7] for part in text.split("magic numbers for ")[1:]}
    return out
  assert needles(SPEC) and not needles(SPEC) & needles(test_spec)


def test_document_logits_equal_the_packed_forward_and_train_the_closing_id():
  lengths, active = CASES["awkward"]
  model = small_model()
  batch = random_memory_batch(lengths, active, seed=11)
  gd, st = nnx.split(model)
  _, _, doc_logits = memory_forward(gd, st, batch, doc_logits=True)
  ref = packed.run(model, batch.to_packed())
  lens = np.asarray(batch.doc_lengths)
  for r in range(lens.shape[0]):
    start = 0
    for j, n in enumerate(lens[r]):
      np.testing.assert_allclose(np.asarray(doc_logits)[r, j, :n],
                                 np.asarray(ref.logits)[r, start:start + n], atol=2e-5)
      start += n
  # Labels on the closing id: digits and "]" only.
  doc = render.render_docs(TOK, [4071], ["some text"])[0]
  labels = render.closing_id_labels(TOK, 4071, doc)
  assert TOK.decode(labels[labels >= 0]) == "4071]"
  with pytest.raises(ValueError, match="closing id"):
    render.closing_id_labels(TOK, 4072, doc)
  spec = dataclasses.replace(SPEC, doc_labels=True, label_restated=True, answer_fraction=1.0)
  b, _ = batches.build(TOK, spec, 0)
  w = LossWeights.of(1.0, 0.1, 0.0, 1.0)
  _, metrics = loss_and_metrics(*nnx.split(small_model(k=4)), b, w)
  assert float(metrics.doc_loss) > 0
  # The restated question is labelled too.
  lab = np.asarray(b.labels)[0]
  assert "The user's question is: " in TOK.decode(lab[lab >= 0])


def test_route_softness_scores_documents_by_the_smooth_max_and_zero_is_exact():
  lengths, active = CASES["awkward"]
  model = small_model()
  batch = random_memory_batch(lengths, active, seed=6)
  gd, st = nnx.split(model)
  _, exact = memory_forward(gd, st, batch)
  _, zero = memory_forward(gd, st, batch, route_softness=jnp.float32(0.0))
  _, soft = memory_forward(gd, st, batch, route_softness=jnp.float32(0.2))
  for layer in exact:
    e, z, s = (np.asarray(r[layer].doc_scores) for r in (exact, zero, soft))
    np.testing.assert_array_equal(z, e)
    np.testing.assert_array_equal(np.isneginf(s), np.isneginf(e))
    fin = np.isfinite(e)
    assert np.all(s[fin] <= e[fin] + 1e-6) and np.any(s[fin] < e[fin] - 1e-3)
  # The aux loss is the InfoNCE of the smooth scores (float64 reference), and it trains the router.
  tau = float(model.temperature[...])
  aux = np.asarray(batch.aux_labels)
  w = LossWeights.of(0.0, 1.0, route_softness=0.2)
  _, metrics = loss_and_metrics(gd, st, batch, w)
  want = np.mean([np.mean([_infonce64(np.asarray(soft[l].doc_scores)[r, 1:], aux[r] > 0, tau)
                           for r in range(len(aux))]) for l in model.cfg.aux_loss_layers])
  np.testing.assert_allclose(float(metrics.aux_loss), want, rtol=1e-5)
