"""Copy rows: every labelled token is a copy of earlier context, and copy steps train in the loop."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from msa_jax.data import copying, render, text
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.math import roles
from msa_jax.math.losses import IGNORE_INDEX
from msa_jax.train import batches, loop
from msa_jax.train.forward import LossWeights, loss_and_metrics

from tests.test_train import small_model

TOK = ByteTokenizer()
SPEC = copying.CopySpec(span_rows=6, span_length=96, lookup_rows=3, seed=5)


def _labelled_runs(row):
  """(start, end) of maximal runs of labelled positions."""
  keep = np.r_[False, row.labels != IGNORE_INDEX, False]
  edges = np.flatnonzero(np.diff(keep.astype(int)))
  return list(zip(edges[::2], edges[1::2]))


def _rows_of(kind, split=Split.TRAIN, steps=range(8)):
  spec = dataclasses.replace(SPEC, split=split,
                             lookup_fraction=1.0 if kind is copying.RowKind.LOOKUP else 0.0)
  return [r for s in steps for r in copying.rows(TOK, spec, s)]


def test_rows_are_a_pure_function_of_the_step_and_batches_have_one_kind():
  for s in range(6):
    a, b = copying.rows(TOK, SPEC, s), copying.rows(TOK, SPEC, s)
    assert len({r.kind for r in a}) == 1
    assert len(a) == (SPEC.span_rows if a[0].kind is copying.RowKind.SPAN else SPEC.lookup_rows)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.ids, y.ids)
      np.testing.assert_array_equal(x.labels, y.labels)
  kinds = {copying.rows(TOK, SPEC, s)[0].kind for s in range(20)}
  assert kinds == set(copying.RowKind)
  assert all(copying.batch_kind(SPEC, s) is copying.rows(TOK, SPEC, s)[0].kind for s in range(20))


def test_span_rows_label_only_text_that_already_occurred_in_the_row():
  for row in _rows_of(copying.RowKind.SPAN):
    assert row.ids.size == SPEC.span_length and row.roles[0] == roles.QUERY
    assert np.all(row.roles[1:] == roles.ACTIVE)
    runs = _labelled_runs(row)
    assert runs
    for a, b in runs:
      np.testing.assert_array_equal(row.labels[a:b], row.ids[a:b])
      # The copy, with the one unlabelled byte before it, occurs earlier in the row.
      copy = TOK.decode(row.ids[a - 1:b])
      assert copy in TOK.decode(row.ids[:a - 1]), copy


def test_a_one_unit_span_row_copies_its_first_line_once_and_the_batch_pads_it():
  spec = dataclasses.replace(SPEC, span_units=1, span_length=128, lookup_fraction=0.0)
  lengths = set()
  for row in [r for s in range(4) for r in copying.rows(TOK, spec, s)]:
    lengths.add(row.ids.size)
    assert row.ids.size <= 128 and row.roles.shape == row.ids.shape and row.roles[0] == roles.QUERY
    (a, b), = _labelled_runs(row)  # exactly one copy, and it ends the row
    assert b == row.ids.size
    span = TOK.decode(row.ids).split("\n")[0]
    assert TOK.decode(row.ids[a - 1:b]) == span + "\n"
  assert len(lengths) > 1  # rows end with their unit, not at span_length
  batch = batches.build_copy(TOK, spec, 0, top_k=2, pooling_size=4)
  assert batch.input_ids.shape[1] == 128
  with pytest.raises(ValueError, match="units"):
    copying.rows(TOK, dataclasses.replace(spec, span_units=0), 0)


def test_lookup_rows_answer_a_niah_question_from_the_pasted_documents():
  for row in _rows_of(copying.RowKind.LOOKUP):
    full = TOK.decode(row.ids)
    labelled = TOK.decode(row.ids[row.labels != IGNORE_INDEX])
    head, _, answer = full.rpartition(render.ANSWER_LEAD)
    value = answer.removesuffix("<|im_end|>")
    assert labelled.endswith(render.ANSWER_LEAD + value + "<|im_end|>")
    pasted = head.split("<|object_ref_end|>")[1]  # the injected documents
    for v in value.replace(", and ", ", ").replace(" and ", ", ").split(", "):
      assert f"is: {v}." in pasted
    # The question routes; the pasted text and the answer do not.
    assert row.roles[0] == roles.QUERY and row.roles[-1] == roles.ACTIVE


@pytest.mark.parametrize("split", list(Split))
def test_copied_strings_belong_to_the_rows_split(split):
  for row in _rows_of(copying.RowKind.SPAN, split, range(3)):
    for a, b in _labelled_runs(row):
      span = TOK.decode(row.ids[a - 1:b]).removesuffix("\n")
      if b < row.ids.size:  # the row's last copy may be cut
        assert text.split_of(span) == split
  for row in _rows_of(copying.RowKind.LOOKUP, split, range(3)):
    value = TOK.decode(row.ids).rpartition(render.ANSWER_LEAD)[2].removesuffix("<|im_end|>")
    assert all(text.split_of(v) == split
               for v in value.replace(", and ", ", ").replace(" and ", ", ").split(", "))


def test_copy_batches_train_the_lm_loss_only_with_finite_gradients():
  spec = dataclasses.replace(SPEC, span_length=48, lookup_fraction=0.0)
  batch = batches.build_copy(TOK, spec, 0, top_k=2, pooling_size=4)
  assert batch.doc_tokens.shape[:2] == (1, 1) and batch.input_ids.shape == (SPEC.span_rows, 128)
  model = small_model()
  gd, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    return loss_and_metrics(gd, (p, rest), batch, LossWeights.of(1.0, 0.0))

  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert np.isfinite(float(value)) and float(value) == pytest.approx(float(metrics.lm_loss))
  assert int(metrics.tokens) == int(np.sum(np.asarray(batch.labels) != IGNORE_INDEX))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_phases_interleave_copy_steps_and_need_a_copy_stream(tmp_path):
  phases = (loop.Phase(steps=2, lr=1e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=2,
                       copy_every=1),
            loop.Phase(steps=3, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2,
                       copy_every=2, lookup_fraction=1.0, hop_fraction=0.5))
  assert [loop.phase_at(phases, s).is_copy_step(s) for s in range(5)] == [
      True, True, True, False, True]
  spec = batches.BatchSpec(tasks=batches.TaskMix.parse("niah_single_1"), rows=2,
                           docs_per_example=2, doc_chars=60, doc_len=batches.doc_len_for(60, 4),
                           top_k=2, id_digits=(1, 2))
  with pytest.raises(ValueError, match="copy"):
    loop.RunConfig(phases=phases, batch=spec)
  copy = copying.CopySpec(span_rows=2, span_length=64, lookup_rows=1, lookup_fraction=0.0)
  run = loop.RunConfig(phases=phases, batch=spec, copy=copy, log_every=1, eval_every=5,
                       eval_batches=1, checkpoint_every=5)
  loop.train(small_model(), TOK, run, str(tmp_path),
             eval_spec=dataclasses.replace(spec, split=Split.TEST), log=lambda s: None)
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["batch"] for r in train] == ["copy", "copy", "copy", "memory", "copy"]
  # The second phase overrides the stream's share of LOOKUP batches (0 -> 1).
  assert [r["copy_kind"] for r in train] == ["span", "span", "lookup", None, "lookup"]
  assert all(r["aux_loss"] == 0.0 for r in train if r["batch"] == "copy")
  (test,) = [r for r in rows if r["split"] == "test"]
  assert 0.0 <= test["copy_span_accuracy"] <= 1.0 and 0.0 <= test["copy_lookup_accuracy"] <= 1.0
  # A run with multi-hop LOOKUP rows also reports them alone.
  assert 0.0 <= test["copy_hop_accuracy"] <= 1.0 and 0.0 <= test["copy_hop_exact"] <= 1.0


def test_a_phase_sets_the_memory_batches_size_labels_and_optional_overrides():
  base = batches.BatchSpec(tasks=batches.TaskMix.parse("niah_single_1"), rows=3,
                           docs_per_example=2, doc_chars=60, doc_len=batches.doc_len_for(60, 4),
                           top_k=2, id_digits=(1, 2), answer_fraction=0.5, distractors=0)
  plain = loop.Phase(steps=1, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3,
                     doc_weight=1.0, label_restated=True)
  spec = plain.batch_spec(base)
  assert (spec.docs_per_example, spec.doc_labels, spec.label_restated) == (3, True, True)
  assert (spec.distractors, spec.answer_fraction) == (0, 0.5)
  spec = dataclasses.replace(plain, distractors=2, answer_fraction=1.0).batch_spec(base)
  assert (spec.distractors, spec.answer_fraction) == (2, 1.0)
  # Answer rows then paste documents besides the gold one.
  batch, info = batches.build(TOK, spec, 0)
  assert info["kinds"] == ["answer"] * 3
  # A phase may change the memory batches' task mix and the copy stream's multi-hop share.
  hop = dataclasses.replace(plain, tasks="bridge:1,chain_2:1", hop_fraction=0.25)
  assert [n for n, _ in hop.batch_spec(base).tasks.weights] == ["bridge", "chain_2"]
  assert hop.copy_spec(copying.CopySpec()).hop_fraction == 0.25
  assert plain.copy_spec(copying.CopySpec(hop_fraction=0.1)).hop_fraction == 0.1
  pasted = [len(re.findall(r"\[\d+\]\. ", TOK.decode(np.asarray(row)))) for row in batch.input_ids]
  assert max(pasted) > 1 and all(1 <= n <= 3 for n in pasted), pasted


def test_hop_lookup_rows_paste_every_hop_and_hard_negatives_and_answer_the_last_hop():
  spec = dataclasses.replace(SPEC, lookup_fraction=1.0, hop_fraction=1.0, lookup_rows=6)
  docs_per_row, chains = set(), 0
  for s in range(4):
    for row in copying.rows(TOK, spec, s):
      full = TOK.decode(row.ids)
      head, _, answer = full.rpartition(render.ANSWER_LEAD)
      value = answer.removesuffix("<|im_end|>")
      labelled = TOK.decode(row.ids[row.labels != IGNORE_INDEX])
      assert labelled.endswith(render.ANSWER_LEAD + value + "<|im_end|>")
      pasted = head.split("<|object_ref_end|>")[1]
      docs_per_row.add(len(re.findall(r"\[\d+\]\.", pasted)))
      assert value in pasted  # the last hop's document
      if (m := re.search(r"value of (VAR \w+)", full)):  # a chain: its first hop is pasted too
        chains += 1
        assert f"{m.group(1)} = " in pasted
  assert chains > 0
  assert docs_per_row <= {3, 4, 5} and len(docs_per_row) >= 2  # 2-3 hops + 1-2 hard negatives


def test_hop_share_zero_leaves_the_niah_lookup_stream_unchanged_and_bad_tasks_fail():
  plain = dataclasses.replace(SPEC, lookup_fraction=1.0)
  explicit = dataclasses.replace(plain, hop_fraction=0.0, hop_tasks=("chain_3",))
  for s in range(3):
    assert [r.ids.tolist() for r in copying.rows(TOK, plain, s)] == [
        r.ids.tolist() for r in copying.rows(TOK, explicit, s)]
  # Token-id sums of LOOKUP batches 3-5 of the default stream, recorded before multi-hop rows
  # existed: the runs that made the shipped model keep their data.
  default = copying.CopySpec(lookup_fraction=1.0, span_units=1)
  assert [sum(int(r.ids.sum()) for r in copying.rows(TOK, default, s)) for s in (3, 4, 5)] == [
      362521, 342156, 357198]
  with pytest.raises(ValueError, match="not a multi-hop task"):
    copying.CopySpec(hop_fraction=0.5, hop_tasks=("niah_single_1",))
  with pytest.raises(ValueError, match="unknown task"):
    copying.CopySpec(hop_fraction=0.5, hop_tasks=("bridges",))
  with pytest.raises(ValueError, match="hop_fraction"):
    copying.CopySpec(hop_fraction=1.5)
