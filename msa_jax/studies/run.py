"""Asking a study memory its questions: through MSA (bank + Memory Interleave) or with documents
pasted into a dense prompt (the dense, RAG, oracle and no-context baselines).

Every question runs alone (batch 1), so `latency_s` is the wall time of one query end to end
(routing, prefill, every decoding step and round); the first question of a run is asked once
untimed to compile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import numpy as np

from msa_jax.data.tokenizer import Tokenizer
from msa_jax.engine import dense, interleave
from msa_jax.engine.encode import Progress, encode_documents, encode_to_bank
from msa_jax.engine.run import BankRunner, ContentPath
from msa_jax.memory import store
from msa_jax.memory.bank import BankSpec, MemoryBank
from msa_jax.nn.model import MSAForCausalLM
from msa_jax.studies import stats
from msa_jax.studies.memory import Memory, Question


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One question's result."""

  task: str
  accuracy: float  # string_match_all of the answer
  recall: float  # router recall@k of the first round (mean over router layers); nan if none
  hop_recall: tuple[float, ...]  # per hop: fraction of its gold documents in the context
  docs: int  # documents whose text was in the context
  latency_s: float
  answer: str
  # The best gold document's rank among the first round's routed documents (by the highest score
  # over router layers, 1 = best); inf when none was routed, nan when not measured.
  gold_rank: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Built:
  """A memory encoded into a bank."""

  runner: BankRunner
  encode_s: float  # 0 when the bank was already on disk
  bank_bytes: int  # on disk (0 for an in-memory bank)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def encode(model: MSAForCausalLM, tok: Tokenizer, memory: Memory, *, bank_dir: str | None = None,
           dtype: str = "float32", content: ContentPath | None = None,
           log: Callable[[str], None] | None = None) -> Built:
  """Stage 1 for a study memory: in memory, or into a resumable on-disk bank at `bank_dir`."""
  tokens, lengths = memory.rendered(tok)
  t0 = time.perf_counter()
  progress = Progress(len(lengths), int(lengths.sum())) if log else None
  if bank_dir is None:
    enc = encode_documents(model, tokens, lengths, progress=progress)
    bank = MemoryBank.from_encoded(BankSpec.for_model(model.cfg), enc, doc_ids=memory.ids)
    size = 0
  else:
    encode_to_bank(model, tokens, lengths, bank_dir, dtype=dtype, progress=progress)
    bank = store.open_bank(bank_dir, verify=False)
    size = _dir_bytes(bank_dir)
  encode_s = time.perf_counter() - t0
  return Built(BankRunner(model, bank, content=content), encode_s, size)


def _gold_rank(q: Question, first: interleave.Round) -> float:
  best: dict[int, float] = {}
  for l, ids in first.selected.items():
    for i, s in zip(ids, first.scores[l]):
      best[i] = max(best.get(i, -np.inf), s)
  order = sorted(best, key=lambda i: (-best[i], i))
  ranks = [order.index(g) + 1 for g in q.gold if g in best]
  return float(min(ranks)) if ranks else float("inf")


def _hop_recall(q: Question, context: Sequence[int]) -> tuple[float, ...]:
  got = set(context)
  return tuple(float(np.mean([x in got for x in hop])) for hop in q.hops)


def ask_msa(built: Built, tok: Tokenizer, memory: Memory, *, naming: interleave.Naming,
            router_docs: int = 2, max_rounds: int = 3,
            questions: Sequence[Question] | None = None) -> list[Outcome]:
  """Memory Interleave for each question of the memory (or `questions`), one at a time."""
  model = built.runner.model
  generate = interleave.runner_fn(built.runner)
  texts = dict(enumerate(memory.texts))
  start = model.cfg.msa.top_k_docs + (built.runner.bank.template.tokens.size
                                      if built.runner.bank.template else 0)
  qs = list(memory.questions if questions is None else questions)

  def once(question: str):
    return interleave.run(generate, tok, [question], texts, start_position=start,
                          max_rounds=max_rounds, naming=naming, router_docs=router_docs)[0]

  out = []
  for q, (trace, latency) in zip(qs, interleave.timed(once, [q.question for q in qs])):
    first = trace.rounds[0].selected if trace.rounds else {}
    recall = (float(np.mean([np.mean([x in sel for x in q.gold]) for sel in first.values()]))
              if first else float("nan"))
    out.append(Outcome(q.task, stats.string_match_all(trace.answer, q.answers), recall,
                       _hop_recall(q, trace.retrieved), len(trace.retrieved), latency,
                       trace.answer, _gold_rank(q, trace.rounds[0]) if trace.rounds else
                       float("nan")))
  return out


def ask_pasted(model: MSAForCausalLM, tok: Tokenizer, memory: Memory,
               choose: Callable[[Question], Sequence[int]], *, chunk: int = 512,
               questions: Sequence[Question] | None = None) -> list[Outcome]:
  """Each question answered densely with the documents `choose(question)` pasted in its prompt."""
  start = model.cfg.msa.top_k_docs
  qs = list(memory.questions if questions is None else questions)

  def once(q: Question, ids):
    docs = [(int(i), memory.texts[i]) for i in ids]
    return dense.answer(model, tok, [q.question], [docs], start_position=start, chunk=chunk)[0]

  if qs:
    once(qs[0], choose(qs[0]))  # compile
  out = []
  for q in qs:
    t0 = time.perf_counter()
    ids = list(choose(q))
    answer = once(q, ids)
    latency = time.perf_counter() - t0
    out.append(Outcome(q.task, stats.string_match_all(answer, q.answers), float("nan"),
                       _hop_recall(q, ids), len(ids), latency, answer))
  return out


def _rank_stats(ranks: Sequence[float]) -> dict:
  """recall@1 and the median gold rank (None: beyond the routed documents) of measured ranks."""
  r = np.asarray([x for x in ranks if not np.isnan(x)], np.float64)
  if not r.size:
    return {"recall_at_1": None, "median_gold_rank": None}
  median = float(np.median(r))
  return {"recall_at_1": float(np.mean(r == 1)),
          "median_gold_rank": median if np.isfinite(median) else None}


def summarize(outcomes: Sequence[Outcome]) -> dict:
  """Per-task means (accuracy with a 95% bootstrap interval), over all tasks as `all`."""
  by: dict[str, list[Outcome]] = {}
  for o in outcomes:
    by.setdefault(o.task, []).append(o)
  by["all"] = list(outcomes)
  res = {}
  for task, os_ in by.items():
    acc = [o.accuracy for o in os_]
    rec = [o.recall for o in os_ if not np.isnan(o.recall)]
    hops = max(len(o.hop_recall) for o in os_)
    res[task] = {
        "n": len(os_), "accuracy": float(np.mean(acc)), "accuracy_ci95": stats.bootstrap_ci(acc),
        "recall": float(np.mean(rec)) if rec else None,
        "hop_recall": [float(np.mean([o.hop_recall[h] for o in os_ if len(o.hop_recall) > h]))
                       for h in range(hops)],
        "docs": float(np.mean([o.docs for o in os_])),
        **_rank_stats([o.gold_rank for o in os_]),
        "latency_s": float(np.median([o.latency_s for o in os_]))}
  return res
