"""Memory Interleave follows the protocol of SPEC §10, checked with a scripted generator."""

import numpy as np

from msa_jax.data import render
from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.engine import interleave
from msa_jax.math import roles

TOK = ByteTokenizer()
TEXTS = {5: "Pell Quint keeps the vault.", 12: "Pell Quint was born in Ostra Vale.", 40: "Filler."}


class Scripted:
  """Answers call n with script[n] (per row) and records every request it was given."""

  def __init__(self, script):
    self.script, self.requests = script, []

  def __call__(self, request, max_new_tokens, stop_tokens):
    self.requests.append(request)
    outs = self.script[len(self.requests) - 1]
    b = int(request.input_ids.shape[0])
    assert len(outs) == b
    tokens = np.full((b, max_new_tokens), -1, np.int32)
    for r, text in enumerate(outs):
      ids = TOK.encode(text)
      stop = [i for i, t in enumerate(ids) if t in stop_tokens]
      ids = ids[:stop[0] + 1] if stop else ids
      tokens[r, :min(ids.size, max_new_tokens)] = ids[:max_new_tokens]
    selected = np.array([[5, 12]] * b), np.array([[0.9, 0.5]] * b, np.float32)
    return tokens, {2: selected}


def row(request, r):
  """(text, routing text) of row r of a request: valid tokens, and those with role 0."""
  m = np.asarray(request.attention_mask)[r] > 0
  ids, role = np.asarray(request.input_ids)[r][m], np.asarray(request.doc_ids)[r][m]
  return TOK.decode(ids), TOK.decode(ids[role == roles.QUERY])


def test_ids_then_text_then_reroute_then_end_marker_then_answer():
  q = "Where was the keeper of the vault born?"
  gen = Scripted([["[5]<|object_ref_end|>"], ["[12]<|object_ref_end|>"], ["<End-of-Retrieve>"],
                  ["The answer to the question is: Ostra Vale<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, [q], TEXTS, start_position=8)
  texts = [row(r, 0) for r in gen.requests]
  # Round 1 routes on the question alone.
  assert texts[0] == (q + "\n<|im_end|>\n<|im_start|>", q + "\n")
  # Round 2: the generated ids, then document 5's text, which routes with the question.
  assert texts[1][0] == texts[0][0] + "[5]<|object_ref_end|>[5]. " + TEXTS[5] + "\n<|object_ref_end|>"
  assert texts[1][1] == q + "\n[5]. " + TEXTS[5] + "\n<|object_ref_end|>"
  # Round 3: only the newest document routes with the question.
  assert texts[2][1] == q + "\n[12]. " + TEXTS[12] + "\n<|object_ref_end|>"
  assert texts[2][0].endswith("[12]<|object_ref_end|>[12]. " + TEXTS[12] + "\n<|object_ref_end|>")
  # The answer request: end marker (generated), restated question (injected).
  assert texts[3][0] == texts[2][0] + "<End-of-Retrieve>" + render.restate_text(q)
  assert trace.answer == "Ostra Vale"
  assert trace.retrieved == (5, 12) and not trace.forced_end
  assert [r.doc_ids for r in trace.rounds] == [(5,), (12,), ()]
  assert trace.rounds[0].selected == {2: (5, 12)}
  # Positions start at start_position and increase by one.
  pos = np.asarray(gen.requests[3].position_ids)[0][np.asarray(gen.requests[3].attention_mask)[0] > 0]
  np.testing.assert_array_equal(pos, 8 + np.arange(pos.size))


def test_unknown_ids_are_ignored_and_reported():
  gen = Scripted([["[5][999]<|object_ref_end|>"], ["<End-of-Retrieve>"],
                  ["The answer to the question is: x<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0)
  assert trace.rounds[0].doc_ids == (5,) and trace.rounds[0].unknown_ids == (999,)
  assert "[999]." not in row(gen.requests[1], 0)[0]


def test_only_unknown_ids_end_retrieval():
  gen = Scripted([["[999]<|object_ref_end|>"], ["The answer to the question is: x<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0)
  assert trace.forced_end and trace.retrieved == ()
  assert row(gen.requests[1], 0)[0].endswith("<End-of-Retrieve>" + render.restate_text("q?"))


def test_round_limit_ends_retrieval_for_the_model():
  gen = Scripted([["[5]<|object_ref_end|>"], ["[12]<|object_ref_end|>"],
                  ["The answer to the question is: y<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0, max_rounds=2)
  assert trace.forced_end and trace.retrieved == (5, 12) and trace.answer == "y"
  assert len(gen.requests) == 3
  assert "<End-of-Retrieve>" in row(gen.requests[2], 0)[0]


def test_rows_of_a_batch_proceed_independently():
  gen = Scripted([["[5]<|object_ref_end|>", "<End-of-Retrieve>"], ["<End-of-Retrieve>"],
                  ["The answer to the question is: a<|im_end|>",
                   "The answer to the question is: b<|im_end|>"]])
  traces = interleave.run(gen, TOK, ["first?", "second?"], TEXTS, start_position=0)
  assert int(gen.requests[1].input_ids.shape[0]) == 1  # only the retrieving row runs round 2
  assert [t.answer for t in traces] == ["a", "b"]
  assert traces[0].retrieved == (5,) and traces[1].retrieved == ()


def test_router_naming_appends_the_best_routed_documents_not_yet_appended():
  # The scripted router ranks 5 (0.9) over 12 (0.5); what the model writes in routing calls is
  # ignored, and after max_rounds the model answers without being forced.
  gen = Scripted([["ignored"], ["ignored"], ["The answer to the question is: z<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0, max_rounds=2,
                            naming=interleave.Naming.ROUTER, router_docs=1)
  assert [r.doc_ids for r in trace.rounds] == [(5,), (12,)]
  assert [r.generated for r in trace.rounds] == ["[5]<|object_ref_end|>", "[12]<|object_ref_end|>"]
  assert row(gen.requests[1], 0)[0].endswith("[5]<|object_ref_end|>[5]. " + TEXTS[5]
                                             + "\n<|object_ref_end|>")
  assert row(gen.requests[2], 0)[0].endswith(
      "[12]. " + TEXTS[12] + "\n<|object_ref_end|><End-of-Retrieve>" + render.restate_text("q?"))
  assert trace.answer == "z" and not trace.forced_end


def test_router_naming_takes_each_documents_best_score_over_layers():
  class TwoLayers(Scripted):
    def __call__(self, request, max_new_tokens, stop_tokens):
      tokens, _ = super().__call__(request, max_new_tokens, stop_tokens)
      return tokens, {2: (np.array([[5, 12]]), np.array([[0.9, 0.5]], np.float32)),
                      3: (np.array([[40, 5]]), np.array([[0.95, 0.1]], np.float32))}

  gen = TwoLayers([["ignored"], ["The answer to the question is: z<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0, max_rounds=1,
                            naming=interleave.Naming.ROUTER, router_docs=2)
  assert trace.rounds[0].doc_ids == (40, 5)


def test_router_until_end_lets_the_model_end_retrieval_and_the_router_name_documents():
  # Round 1: the model opens ids ("[7]..." would name 7; the router's 5 is appended instead).
  # Round 2: the model's first token is the end marker: retrieval ends there, not forced.
  gen = Scripted([["[7]<|object_ref_end|>"], ["<End-of-Retrieve>"],
                  ["The answer to the question is: z<|im_end|>"]])
  (trace,) = interleave.run(gen, TOK, ["q?"], TEXTS, start_position=0, max_rounds=3,
                            naming=interleave.Naming.ROUTER_UNTIL_END, router_docs=1)
  assert [r.doc_ids for r in trace.rounds] == [(5,), ()]
  assert [r.generated for r in trace.rounds] == ["[5]<|object_ref_end|>", "<End-of-Retrieve>"]
  assert len(gen.requests) == 3 and not trace.forced_end and trace.answer == "z"
  # The end marker is in the answer request once (generated, not supplied again).
  assert row(gen.requests[2], 0)[0].endswith(
      "[5]. " + TEXTS[5] + "\n<|object_ref_end|><End-of-Retrieve>" + render.restate_text("q?"))


def test_router_until_end_rows_stop_on_their_own_and_the_round_limit_forces_the_rest():
  gen = Scripted([["[", "<End-of-Retrieve>"], ["["],
                  ["The answer to the question is: a<|im_end|>",
                   "The answer to the question is: b<|im_end|>"]])
  first, second = interleave.run(gen, TOK, ["first?", "second?"], TEXTS, start_position=0,
                                 max_rounds=2, naming=interleave.Naming.ROUTER_UNTIL_END,
                                 router_docs=1)
  assert int(gen.requests[1].input_ids.shape[0]) == 1  # only the first row retrieves again
  assert first.retrieved == (5, 12) and first.forced_end  # the model never ended: the limit did
  assert second.retrieved == () and not second.forced_end
  assert [t.answer for t in (first, second)] == ["a", "b"]
