"""Memory Interleave (SPEC §10): generate document ids, append their text, re-route; then answer.

Each round is a stage-2 routing over the same memory followed by decoding:
- the model writes `[id]...[id]<|object_ref_end|>`; ids found in the memory have their original
  text appended (`[id]. text\\n...<|object_ref_end|>`), which routes in the next round together with
  the question (earlier injected text stops routing, as in the official engine); ids not in the
  memory are ignored and reported in the trace;
- the model writes `<End-of-Retrieve>`: the question is restated and the answer generated.
At the round limit, retrieval is ended for the model (the official engine's safety valve).

Requests are batched: every row keeps its own context, and the rows still retrieving run together,
left padded to a power of two (at least `min_length`) so that few shapes compile.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from msa_jax.data import render
from msa_jax.data.tokenizer import Special, Tokenizer
from msa_jax.engine.prefill import Request
from msa_jax.math import roles

_ID = re.compile(r"\[(\d+)\]")


class Naming(enum.Enum):
  """Who names the documents of a round.

  MODEL: the model writes `[id]...<|object_ref_end|>` (SPEC §10; the paper's Memory Interleave).
  ROUTER: the engine writes the ids of the router's best-scoring documents not yet appended (by
    their highest score over router layers), for exactly `max_rounds` rounds, then the model
    answers. This is the router used as a retriever, for models that have not learned to name
    documents; its traces record the ids as generated text all the same.
  ROUTER_UNTIL_END: the model decides each round whether to retrieve: if the first token it
    generates is `<End-of-Retrieve>` (or an end of text), retrieval ends; otherwise the router
    names the documents as in ROUTER. The number of rounds is the model's, the ids the router's:
    for models that learned when a question is answerable but not to write ids from memory.
  """

  MODEL = "model"
  ROUTER = "router"
  ROUTER_UNTIL_END = "router_until_end"


@dataclasses.dataclass(frozen=True)
class Round:
  """One retrieval round of one request."""

  generated: str  # what the model wrote this round (ids and delimiter, or the end marker)
  doc_ids: tuple[int, ...]  # ids it named that exist in the memory (appended, in order)
  unknown_ids: tuple[int, ...]  # ids it named that do not exist (ignored)
  selected: dict[int, tuple[int, ...]]  # router layer -> the k documents routed this round
  scores: dict[int, tuple[float, ...]]  # their scores


@dataclasses.dataclass(frozen=True)
class Trace:
  rounds: tuple[Round, ...]
  answer: str  # the text after "The answer to the question is: "
  forced_end: bool  # retrieval was ended by the round limit or a malformed round

  @property
  def retrieved(self) -> tuple[int, ...]:
    """Every document whose text was appended, in order, without repeats."""
    return tuple(dict.fromkeys(i for r in self.rounds for i in r.doc_ids))


# A generator: (Request, max_new_tokens, stop_tokens) -> (tokens [B, N] with -1 after a stop,
# per router layer (selected ids [B, k], scores [B, k])). `BankRunner` gives one via `runner_fn`.
Generate = Callable[[Request, int, tuple[int, ...]],
                    tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]]


def timed(ask: Callable[[str], Trace], questions: Sequence[str]) -> list[tuple[Trace, float]]:
  """(trace, seconds) of `ask` on each question, one at a time; the first question is run once
  before timing, so compilation is not counted (later questions reuse the compiled shapes)."""
  import time
  if questions:
    ask(questions[0])
  out = []
  for q in questions:
    t0 = time.perf_counter()
    trace = ask(q)
    out.append((trace, time.perf_counter() - t0))
  return out


def runner_fn(runner) -> Generate:
  """Adapts a `BankRunner` to the `Generate` signature."""

  def generate(request, max_new_tokens, stop_tokens):
    g = runner.generate(request, max_new_tokens, stop_tokens=stop_tokens)
    routed = {l: (np.asarray(r.doc_ids), np.asarray(r.scores)) for l, r in g.prefill.routed.items()}
    return np.asarray(g.tokens), routed

  return generate


def _request(actives: Sequence[render.Active], start_position: int, min_length: int,
             pad_id: int) -> Request:
  t = max(min_length, 1 << (max(a.ids.size for a in actives) - 1).bit_length())
  b = len(actives)
  arr = {"input_ids": np.full((b, t), pad_id, np.int32), "doc_ids": np.full((b, t), -1, np.int32),
         "attention_mask": np.zeros((b, t), np.int32), "position_ids": np.zeros((b, t), np.int32)}
  for r, a in enumerate(actives):
    n = a.ids.size
    arr["input_ids"][r, t - n:] = a.ids
    arr["doc_ids"][r, t - n:] = a.roles
    arr["attention_mask"][r, t - n:] = 1
    arr["position_ids"][r, t - n:] = start_position + np.arange(n)
  return Request.from_arrays(arr)


def _cut(tokens: np.ndarray) -> np.ndarray:
  """A row of generated tokens up to and including its stop token."""
  end = np.flatnonzero(tokens < 0)
  return tokens[:end[0]] if end.size else tokens


def _router_named(tok: Tokenizer, routed, done: Sequence[Sequence[Round]], n: int) -> np.ndarray:
  """Rows of `[id]...<|object_ref_end|>` tokens naming each row's n best routed documents.

  A document's score is its highest over router layers; documents already appended are skipped.
  Rows are -1 padded after the delimiter, like generated tokens after a stop.
  """
  rows = []
  for j, past in enumerate(done):
    seen = {x for r in past for x in r.doc_ids}
    best: dict[int, float] = {}
    for ids, scores in routed.values():
      for x, sc in zip(ids[j], scores[j]):
        if x >= 0 and x not in seen:
          best[int(x)] = max(best.get(int(x), -np.inf), float(sc))
    named = sorted(best, key=lambda x: -best[x])[:n]
    rows.append(tok.encode(render.ids_text(named)))
  out = np.full((len(rows), max(r.size for r in rows)), -1, np.int32)
  for j, r in enumerate(rows):
    out[j, :r.size] = r
  return out


def _text(tok: Tokenizer, ids: np.ndarray, role: int) -> render.Active:
  ids = np.asarray(ids, np.int32)
  return render.Active(ids, np.full(ids.size, role, np.int32), np.zeros(ids.size, bool))


def run(generate: Generate, tok: Tokenizer, questions: Sequence[str], texts: Mapping[int, str], *,
        start_position: int, max_rounds: int = 3, max_id_tokens: int = 64,
        max_answer_tokens: int = 96, min_length: int = 64, naming: Naming = Naming.MODEL,
        router_docs: int = 2) -> list[Trace]:
  """Memory Interleave for a batch of questions over one memory.

  texts: document id -> original text (the text that was encoded, without the `[id]. ` frame).
  start_position: position of the first active token (template length + top_k, SPEC §2).
  naming, router_docs: see `Naming`; router_docs is how many documents the router names a round.
  """
  ref_end, end_ret = tok.special(Special.REF_END), tok.special(Special.END_RETRIEVE)
  im_end, eos, pad = tok.special(Special.IM_END), tok.special(Special.EOS), tok.special(Special.PAD)
  prompts = [render.prompt(tok, q) for q in questions]
  question_len = [int(np.sum(p.roles == roles.QUERY)) for p in prompts]
  contexts = list(prompts)
  rounds: list[list[Round]] = [[] for _ in questions]
  forced = [False] * len(questions)
  retrieving = list(range(len(questions)))
  for _ in range(max_rounds):
    if not retrieving:
      break
    request = _request([contexts[i] for i in retrieving], start_position, min_length, pad)
    stops = (ref_end, end_ret, im_end, eos)
    if naming is Naming.MODEL:
      tokens, routed = generate(request, max_id_tokens, stops)
    else:
      first, routed = generate(request, 1, stops)
      tokens = _router_named(tok, routed, [rounds[i] for i in retrieving], router_docs)
      if naming is Naming.ROUTER_UNTIL_END:
        # A row whose model ends retrieval keeps that token alone (a stop, as if generated).
        ended = np.isin(np.asarray(first)[:, 0], (end_ret, im_end, eos))
        tokens[ended] = -1
        tokens[ended, 0] = np.asarray(first)[ended, 0]
    still = []
    for j, i in enumerate(retrieving):
      out = _cut(tokens[j])
      text = tok.decode(out)
      selected = {l: tuple(int(x) for x in ids[j] if x >= 0) for l, (ids, _) in routed.items()}
      scores = {l: tuple(float(s) for s, x in zip(sc[j], ids[j]) if x >= 0)
                for l, (ids, sc) in routed.items()}
      named = [int(x) for x in _ID.findall(text)]
      known = tuple(dict.fromkeys(x for x in named if x in texts))
      unknown = tuple(dict.fromkeys(x for x in named if x not in texts))
      rounds[i].append(Round(text, known, unknown, selected, scores))
      stopped_on = int(out[-1]) if out.size else -1
      if stopped_on == ref_end and known:
        # Earlier injected text stops routing: only the question and the newest text route.
        ctx = contexts[i]
        routes = np.zeros(ctx.ids.size, bool)
        routes[:question_len[i]] = ctx.roles[:question_len[i]] == roles.QUERY
        ctx = render.Active(ctx.ids, np.where(routes, roles.QUERY,
                                              np.where(ctx.roles == roles.QUERY, roles.ACTIVE,
                                                       ctx.roles)).astype(np.int32), ctx.labelled)
        injected = tok.encode(render.injected_text(known, [texts[x] for x in known]))
        contexts[i] = ctx + _text(tok, out, roles.ACTIVE) + _text(tok, injected, roles.QUERY)
        still.append(i)
      else:
        if stopped_on != end_ret:
          forced[i] = True
        contexts[i] = contexts[i] + _text(tok, out[:-1] if stopped_on in (ref_end, im_end, eos)
                                          else out, roles.ACTIVE)
    retrieving = still
  for i in retrieving:  # round limit (the end of retrieval by design under Naming.ROUTER)
    forced[i] = naming is not Naming.ROUTER
  # Answer: the end marker (generated, or supplied when forced), the restated question, answer.
  finals = []
  for i, q in enumerate(questions):
    ctx = contexts[i]
    if not rounds[i] or not rounds[i][-1].generated.endswith("<End-of-Retrieve>"):
      ctx = ctx + _text(tok, [end_ret], roles.ACTIVE)
    finals.append(ctx + _text(tok, tok.encode(render.restate_text(q)), roles.ACTIVE))
  request = _request(finals, start_position, min_length, pad)
  tokens, _ = generate(request, max_answer_tokens, (im_end, eos))
  traces = []
  for i in range(len(questions)):
    text = tok.decode(_cut(tokens[i])).replace("<|im_end|>", "").replace("<|endoftext|>", "")
    answer = text.split(render.ANSWER_LEAD, 1)[1] if render.ANSWER_LEAD in text else text
    traces.append(Trace(tuple(rounds[i]), answer.strip(), forced[i]))
  return traces
