"""Training batches: a shared memory of many examples' documents, one retrieval step per row.

Batch `step` is a pure function of (seed, split, step): its B examples are examples
`step·B .. step·B + B-1` of the task stream, so a resumed run sees the same data in the same order.

Every row of a batch routes over one shared memory that holds the documents of all B examples,
re-numbered with fresh distinct ids. Each document is encoded once per step, and each query
contrasts its gold documents with B·docs_per_example - |gold| others (among them other examples'
needles, which are hard negatives).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from msa_jax.data import copying, niah, render, synthetic
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import Special, Tokenizer
from msa_jax.math import pooling
from msa_jax.math.losses import IGNORE_INDEX
from msa_jax.train.forward import MemoryBatch


class StepKind(enum.Enum):
  """Which retrieval step of its example a row trains."""

  ROUTE = "route"  # context: question (+ earlier rounds); target: the next round's ids
  ANSWER = "answer"  # context: all rounds; target: <End-of-Retrieve> and the answer


@dataclasses.dataclass(frozen=True)
class TaskMix:
  """Tasks with sampling weights: NIAH variants by value ("niah_single_1", ...), "bridge", "chain_k"."""

  weights: tuple[tuple[str, float], ...]

  @classmethod
  def parse(cls, spec: str) -> "TaskMix":
    """"niah_single_1:2,niah_multikey_2:1" (a missing weight is 1)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, _, w = part.partition(":")
      synthetic.generator(name)  # validates
      out.append((name, float(w) if w else 1.0))
    if not out:
      raise ValueError("empty task mix")
    return cls(tuple(out))

  def pick(self, rng: np.random.Generator) -> str:
    names = [n for n, _ in self.weights]
    p = np.asarray([w for _, w in self.weights], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def rounds_of(ex: niah.Example) -> tuple[tuple[int, ...], ...]:
  """Gold document indices per retrieval round (`niah.Example.rounds`)."""
  return ex.rounds


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static sizes and the data stream of training batches."""

  tasks: TaskMix
  rows: int  # B queries per batch
  docs_per_example: int
  doc_chars: int
  doc_len: int  # L: document token slots (a multiple of P and of 64's divisors up to P)
  active_multiple: int = 128  # active length is padded to a multiple of this (few compiles)
  answer_fraction: float = 0.5  # share of batches whose rows train the final (answer) step
  top_k: int = 16  # positions of the active tokens start at top_k (SPEC §2)
  id_digits: tuple[int, int] = (1, 6)
  seed: int = 0
  split: Split = Split.TRAIN
  label_restated: bool = False  # label the injected restated question (`render.final`)
  doc_labels: bool = False  # give documents labels on their closing `[id]`
  # Answer rows: besides the gold documents, the last round's injected text holds up to this many
  # other documents of the memory (shuffled in), so that the answer is copied from the document
  # that matches the question, as at inference where the named or routed documents include
  # non-gold ones, rather than from the only candidate in context.
  distractors: int = 0
  # Every row of a batch asks the same task (drawn once per batch), so that the other rows'
  # needles, the router's negatives, share the gold needle's format, as in a memory built from
  # one task; rows of mixed tasks leave needles that differ in format and are easy to rank below.
  same_task: bool = False
  # Route rows train round `first_route_round` (0-based) or a later one, drawn uniformly; an
  # example with fewer rounds trains its last. 1 = second-hop rows only (NIAH rows unchanged).
  first_route_round: int = 0


def build(tok: Tokenizer, spec: BatchSpec, step: int) -> tuple[MemoryBatch, dict]:
  """Batch number `step` of the stream, and per-row info (task, kind)."""
  rng = np.random.default_rng([spec.seed, int(spec.split), 7, step])
  examples, names = [], []
  shared = spec.tasks.pick(rng) if spec.same_task else None
  for r in range(spec.rows):
    name = shared or spec.tasks.pick(rng)
    names.append(name)
    examples.append(synthetic.example(name, seed=spec.seed, split=spec.split,
                                      index=step * spec.rows + r, num_docs=spec.docs_per_example,
                                      doc_chars=spec.doc_chars, id_digits=spec.id_digits))
  all_texts = [t for ex in examples for t in ex.docs]
  ids = niah.draw_doc_ids(rng, len(all_texts), spec.id_digits)
  docs = render.render_docs(tok, ids, all_texts)
  # A document longer than doc_len (several long needles in one) widens this batch's block to a
  # multiple of 64 tokens rather than failing; such batches are rare and compile once per width.
  longest = max(d.size for d in docs)
  width = spec.doc_len if longest <= spec.doc_len else -(-longest // 64) * 64
  m = len(docs)
  doc_tokens = np.zeros((1, m, width), np.int32)
  doc_lengths = np.zeros((1, m), np.int32)
  doc_labels = np.full((1, m, width), IGNORE_INDEX, np.int32)
  for j, d in enumerate(docs):
    doc_tokens[0, j, :d.size], doc_lengths[0, j] = d, d.size
    if spec.doc_labels:
      doc_labels[0, j, :d.size] = render.closing_id_labels(tok, ids[j], d)

  actives, aux, kinds = [], np.zeros((spec.rows, m), np.int32), []
  offset = 0
  # One kind per batch: answer rows are several times longer than route rows, and a batch is
  # padded to its longest row.
  answer = bool(rng.random() < spec.answer_fraction)
  for r, ex in enumerate(examples):
    rounds = [([ids[offset + g] for g in gold], [all_texts[offset + g] for g in gold])
              for gold in rounds_of(ex)]
    first = min(spec.first_route_round, len(rounds) - 1)
    done = len(rounds) if answer else int(rng.integers(first, len(rounds)))
    if answer and spec.distractors:
      rounds[-1] = _with_distractors(rng, rounds[-1], ids, all_texts, spec.distractors)
    kinds.append(StepKind.ANSWER if answer else StepKind.ROUTE)
    actives.append(render.training_active(tok, ex.question, ex.answer_text, rounds, done,
                                          label_restated=spec.label_restated))
    positive = rounds_of(ex)[done] if done < len(rounds) else ex.gold
    # Earlier rounds' documents are pasted in this row's query and match themselves best; they
    # are left out of its contrast (-1), as the engine does not name them again.
    for earlier in rounds_of(ex)[:done] if done < len(rounds) else ():
      aux[r, [offset + g for g in earlier]] = -1
    aux[r, [offset + g for g in positive]] = 1
    offset += len(ex.docs)

  a = max(x.ids.size for x in actives)
  a = -(-a // spec.active_multiple) * spec.active_multiple
  pad = tok.special(Special.PAD)
  arrays = dict(input_ids=np.full((spec.rows, a), pad, np.int32),
                roles=np.full((spec.rows, a), -1, np.int32),
                positions=np.zeros((spec.rows, a), np.int32), mask=np.zeros((spec.rows, a), np.int32),
                labels=np.full((spec.rows, a), IGNORE_INDEX, np.int32),
                answer_labels=np.full((spec.rows, a), IGNORE_INDEX, np.int32))
  for r, act in enumerate(actives):
    n = act.ids.size
    arrays["input_ids"][r, :n], arrays["roles"][r, :n] = act.ids, act.roles
    arrays["positions"][r, :n] = spec.top_k + np.arange(n)
    arrays["mask"][r, :n] = 1
    arrays["labels"][r, :n] = render.labels_of(act)
    arrays["answer_labels"][r, :n] = render.answer_labels_of(act)
  if spec.doc_labels:
    arrays["doc_labels"] = doc_labels
  batch = MemoryBatch.from_arrays(dict(doc_tokens=doc_tokens, doc_lengths=doc_lengths,
                                       aux_labels=aux, **arrays))
  return batch, {"tasks": names, "kinds": [k.value for k in kinds]}


def _with_distractors(rng: np.random.Generator, round_: tuple[list[int], list[str]], ids,
                      texts, most: int) -> tuple[list[int], list[str]]:
  """The round's (ids, texts) with 0..most other documents of the memory, in random order."""
  gold_ids, gold_texts = round_
  others = [j for j in range(len(ids)) if ids[j] not in gold_ids]
  n = int(rng.integers(0, min(most, len(others)) + 1))
  extra = [others[j] for j in rng.choice(len(others), n, replace=False)] if n else []
  pairs = list(zip(gold_ids, gold_texts)) + [(ids[j], texts[j]) for j in extra]
  order = rng.permutation(len(pairs))
  return [pairs[j][0] for j in order], [pairs[j][1] for j in order]


def doc_len_for(doc_chars: int, pooling_size: int) -> int:
  """Token slots for a rendered document of about doc_chars bytes (ids and markers included)."""
  need = doc_chars + 48
  return pooling.num_chunks(need, pooling_size) * pooling_size


def build_copy(tok: Tokenizer, spec: copying.CopySpec, step: int, *, top_k: int = 16,
               pooling_size: int = 16, active_multiple: int = 128) -> MemoryBatch:
  """Copy batch number `step` (`copying.rows`) as a MemoryBatch over a one-document dummy memory.

  The memory forward always routes; here it routes over one empty-text document (its positive
  label keeps the aux loss finite; train copy batches with aux weight 0).
  """
  rs = copying.rows(tok, spec, step)
  dummy = render.render_docs(tok, [0], [""])[0]
  width = pooling.num_chunks(dummy.size, pooling_size) * pooling_size
  doc_tokens = np.zeros((1, 1, width), np.int32)
  doc_tokens[0, 0, :dummy.size] = dummy
  a = -(-max(r.ids.size for r in rs) // active_multiple) * active_multiple
  b = len(rs)
  arrays = dict(input_ids=np.full((b, a), tok.special(Special.PAD), np.int32),
                roles=np.full((b, a), -1, np.int32), positions=np.zeros((b, a), np.int32),
                mask=np.zeros((b, a), np.int32), labels=np.full((b, a), IGNORE_INDEX, np.int32))
  for i, r in enumerate(rs):
    n = r.ids.size
    arrays["input_ids"][i, :n], arrays["roles"][i, :n] = r.ids, r.roles
    arrays["positions"][i, :n] = top_k + np.arange(n)
    arrays["mask"][i, :n] = 1
    arrays["labels"][i, :n] = r.labels
  return MemoryBatch.from_arrays(dict(doc_tokens=doc_tokens,
                                      doc_lengths=np.full((1, 1), dummy.size, np.int32),
                                      aux_labels=np.ones((b, 1), np.int32), **arrays))
