"""Memories of a given size for the scaling and multi-hop studies.

A study memory holds the documents of the examples whose questions are asked, plus the documents
of filler examples of the same tasks (their needles are distractors; their questions are never
asked) until it reaches the target number of tokens. Documents are shuffled and document i gets
id i, which is the id `encode_to_bank` gives it, so that the rendered `[id]. text[id]` and the
bank agree. When the asked examples alone would take more than half of the target size (small
memories), the questions are spread over several memories of that size; each memory is built
(encoded) once and every question it holds is asked of it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from msa_jax.data import render, synthetic
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.train import batches

# Tokens a rendered document adds beyond its text: `<|im_start|>[id]. ` ... `[id]<|im_end|>`.
_FRAME = 14


@dataclasses.dataclass(frozen=True)
class Question:
  task: str
  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]  # ids of the documents that hold the answer
  hops: tuple[tuple[int, ...], ...]  # gold ids per hop (one hop for NIAH)


@dataclasses.dataclass(frozen=True)
class Memory:
  texts: tuple[str, ...]  # document i has id i
  questions: tuple[Question, ...]

  @property
  def ids(self) -> np.ndarray:
    return np.arange(len(self.texts))

  def rendered(self, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token matrix [M, L] (zero padded) and lengths [M] of the rendered documents."""
    docs = render.render_docs(tok, range(len(self.texts)), self.texts)
    lengths = np.asarray([d.size for d in docs], np.int32)
    tokens = np.zeros((len(docs), int(lengths.max())), np.int32)
    for j, d in enumerate(docs):
      tokens[j, :d.size] = d
    return tokens, lengths

  def num_tokens(self, tok: Tokenizer) -> int:
    return int(sum(len(tok.encode(render.doc_text(i, t))) for i, t in enumerate(self.texts)))


def _examples(task: str, indices, *, seed: int, split: Split, docs_per_example: int,
              doc_chars: int):
  return [synthetic.example(task, seed=seed, split=split, index=int(i),
                            num_docs=docs_per_example, doc_chars=doc_chars) for i in indices]


def build(tasks: Sequence[str], per_task: int, size_tokens: int, *, doc_chars: int,
          docs_per_example: int, seed: int = 0, split: Split = Split.TEST) -> list[Memory]:
  """Memories of about `size_tokens` tokens holding `per_task` questions of each task.

  Deterministic in its arguments. Question j of a task is the task's example j at every size,
  so the same questions are asked at every memory size.
  """
  if per_task < 1 or not tasks:
    raise ValueError("a study needs at least one task and one question per task")
  asked = [(t, ex) for t in tasks for ex in _examples(t, range(per_task), seed=seed, split=split,
                                                      docs_per_example=docs_per_example,
                                                      doc_chars=doc_chars)]
  def size(texts) -> int:  # byte-level tokens of the rendered documents (ids ~ 4 digits)
    return sum(len(t.encode()) + _FRAME for t in texts)

  per_example = np.mean([size(ex.docs) for _, ex in asked])
  per_memory = max(1, int((size_tokens // 2) // per_example))
  order = np.random.default_rng([seed, int(split), 23]).permutation(len(asked))
  groups = [order[s:s + per_memory] for s in range(0, len(asked), per_memory)]
  memories = []
  for g, group in enumerate(groups):
    rng = np.random.default_rng([seed, int(split), 29, size_tokens, g])
    texts: list[str] = [t for a in group for t in asked[a][1].docs]
    # Filler: examples beyond the asked ones, cycling through the tasks, up to the size.
    total, f = size(texts), 0
    start = per_task + 1_000_000 * (g + 1)  # disjoint from the asked examples and other groups
    while total < size_tokens:
      docs = synthetic.example(tasks[f % len(tasks)], seed=seed, split=split, index=start + f,
                               num_docs=docs_per_example, doc_chars=doc_chars).docs
      texts += docs
      total += size(docs)
      f += 1
    perm = rng.permutation(len(texts))
    new_id = np.empty(len(texts), np.int64)
    new_id[perm] = np.arange(len(texts))
    shuffled = tuple(texts[p] for p in perm)
    questions, first = [], 0  # first: where the asked example's documents start in `texts`
    for a in group:
      task, ex = asked[a]
      ids = lambda local, f=first: tuple(int(new_id[f + i]) for i in local)  # noqa: E731
      questions.append(Question(task=task, question=ex.question, answers=tuple(ex.answers),
                                gold=ids(ex.gold),
                                hops=tuple(ids(h) for h in batches.rounds_of(ex))))
      first += len(ex.docs)
    memories.append(Memory(texts=shuffled, questions=tuple(questions)))
  return memories
