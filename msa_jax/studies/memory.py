"""Memories of a given size for the scaling and multi-hop studies.

A study memory holds the documents of the examples whose questions are asked plus haystack
documents up to the target number of tokens. Documents are shuffled and document i gets id i,
which is the id `encode_to_bank` gives it, so that the rendered `[id]. text[id]` and the bank
agree. When the asked examples alone would take more than half of the target size (small
memories), the questions are spread over several memories of that size; each memory is built
(encoded) once and every question it holds is asked of it.

What fills a NIAH memory is a `Distractors` setting:
- `NONE` (RULER's protocol, the default): the haystack of the variant's own kind, extended to the
  size: repeated noise sentences (single-1), essay prose (single-2/3, multi-key-1, multi-value,
  multi-query: generated, or the sentences of a user's text with `essay=`), or distractor needles
  whose keys and values are never an asked one (multi-key-2/3). The only needles are the asked
  examples' own. Asked examples of variants with the same kind of haystack share memories
  (distinct documents and keys), which `Memory.haystack` names.
- `FILLER_NEEDLES` (a harder setting, not RULER's): the documents of filler examples of the same
  tasks, each with its own needles (a memory of 1M tokens then holds ~6,900 needle sentences), all
  tasks in one memory; filler examples that would repeat an asked key are skipped.
Either way every asked key appears only in its gold documents, which `check_unambiguous` verifies
(`build` raises `AmbiguousMemoryError` otherwise). Multi-hop tasks always use filler examples.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
from typing import Sequence

import numpy as np

from msa_jax.data import niah, render, synthetic, text
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import Tokenizer

# Tokens a rendered document adds beyond its text: `<|im_start|>[id]. ` ... `[id]<|im_end|>`.
_FRAME = 14


class Distractors(enum.Enum):
  """What fills a NIAH study memory beyond the asked examples (see the module docstring)."""

  NONE = "none"
  FILLER_NEEDLES = "filler_needles"


class AmbiguousMemoryError(ValueError):
  """A memory where an asked key also appears outside its gold documents."""


@dataclasses.dataclass(frozen=True)
class Question:
  task: str
  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]  # ids of the documents that hold the answer
  hops: tuple[tuple[int, ...], ...]  # gold ids per hop (one hop for NIAH)
  keys: tuple[str, ...] = ()  # the asked keys (NIAH): each appears only in gold documents


@dataclasses.dataclass(frozen=True)
class Memory:
  texts: tuple[str, ...]  # document i has id i
  questions: tuple[Question, ...]
  haystack: str = ""  # what fills it: "noise", "essay", "needles (words/numbers)", ...

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


def check_unambiguous(memory: Memory) -> None:
  """Raises `AmbiguousMemoryError` unless every question's keys occur only in its gold documents
  (as substrings: a key inside a longer key counts)."""
  joined = "\0".join(memory.texts)
  starts = np.cumsum([0] + [len(t) + 1 for t in memory.texts[:-1]])
  for q in memory.questions:
    for key in q.keys:
      at, found = joined.find(key), set()
      while at >= 0:
        found.add(int(np.searchsorted(starts, at, side="right")) - 1)
        at = joined.find(key, at + 1)
      stray = sorted(found - set(q.gold))
      if stray:
        raise AmbiguousMemoryError(
            f"the key {key!r} of the question {q.question!r} ({q.task}) also appears in "
            f"documents {stray[:5]} besides its gold documents {list(q.gold)}")


def load_essay(directory) -> tuple[str, ...]:
  """The sentences of the `.txt` files of a directory (sorted by name), for an essay haystack:
  whitespace collapsed, sentences that could read as a needle ("special magic") dropped."""
  files = sorted(pathlib.Path(directory).glob("*.txt"))
  if not files:
    raise ValueError(f"no .txt files in {directory}")
  sentences = []
  for f in files:
    for para in f.read_text(encoding="utf-8").split("\n\n"):
      sentences += [s for s in text.split_sentences(" ".join(para.split()))
                    if "special magic" not in s.lower()]
  if not sentences:
    raise ValueError(f"the .txt files in {directory} hold no sentences")
  return tuple(sentences)


def _examples(task: str, indices, *, seed: int, split: Split, docs_per_example: int,
              doc_chars: int):
  return [synthetic.example(task, seed=seed, split=split, index=int(i),
                            num_docs=docs_per_example, doc_chars=doc_chars) for i in indices]


def _size(texts) -> int:  # byte-level tokens of the rendered documents (ids ~ 4 digits)
  return sum(len(t.encode()) + _FRAME for t in texts)


def _haystack_kind(task: str) -> tuple | None:
  """NIAH variants whose haystacks are interchangeable share a kind; None: not NIAH."""
  if not task.startswith("niah_"):
    return None
  spec = niah.SPECS[niah.Variant(task)]
  if spec.haystack is niah.Haystack.NEEDLE:
    return (spec.haystack, spec.key, spec.value)
  return (spec.haystack,)


def _kind_name(kind: tuple | None) -> str:
  if kind is None:
    return "filler examples"
  if kind[0] is niah.Haystack.NEEDLE:
    return f"needles ({kind[1].name.lower()}/{kind[2].name.lower()})"
  return kind[0].name.lower()


def _clashes(a: Sequence[str], b: Sequence[str]) -> bool:
  return any(x in y or y in x for x in a for y in b)


def _distinct_examples(tasks, per_task: int, *, seed: int, split: Split, docs_per_example: int,
                       doc_chars: int, essay) -> list[tuple[str, niah.Example]]:
  """Example j of each task, with keys distinct from the earlier ones (`protected`); an example
  whose documents still hold an earlier example's key, or whose key an earlier one's documents
  hold, is replaced by the task's next unused index (rare: keys are drawn from ~600K)."""
  out: list[tuple[str, niah.Example]] = []
  for task in tasks:
    index = 0
    for _ in range(per_task):
      while True:
        keys = [k for _, ex in out for k in ex.keys]
        ex = niah.example(niah.Variant(task), seed=seed, split=split, index=index,
                          num_docs=docs_per_example, doc_chars=doc_chars, protected=keys,
                          essay=essay)
        index += 1
        text_new, text_old = " ".join(ex.docs), [" ".join(e.docs) for _, e in out]
        if not any(k in text_new for k in keys) and not any(
            k in t for t in text_old for k in ex.keys):
          break
      out.append((task, ex))
  return out


def build(tasks: Sequence[str], per_task: int, size_tokens: int, *, doc_chars: int,
          docs_per_example: int, seed: int = 0, split: Split = Split.TEST,
          distractors: Distractors = Distractors.NONE,
          essay: Sequence[str] | None = None) -> list[Memory]:
  """Memories of about `size_tokens` tokens holding `per_task` questions of each task.

  Deterministic in its arguments. Question j of a task is the task's example j at every size
  (unless its key had to be replaced, the same at every size too). essay: sentences of real prose
  for the essay haystacks (`load_essay`). Raises `AmbiguousMemoryError` if an asked key would
  appear outside its gold documents.
  """
  if per_task < 1 or not tasks:
    raise ValueError("a study needs at least one task and one question per task")
  niah_tasks = [t for t in tasks if t.startswith("niah_")]
  other = [t for t in tasks if not t.startswith("niah_")]
  common = dict(seed=seed, split=split, docs_per_example=docs_per_example, doc_chars=doc_chars)
  asked = _distinct_examples(niah_tasks, per_task, essay=essay, **common)
  asked += [(t, ex) for t in other for ex in _examples(t, range(per_task), **common)]
  if distractors is Distractors.FILLER_NEEDLES or not niah_tasks:
    groups = [(None, asked)]
  else:
    kinds: dict = {}
    for t, ex in asked:
      kinds.setdefault(_haystack_kind(t), []).append((t, ex))
    groups = list(kinds.items())
  memories = []
  for kind, group_asked in groups:
    memories += _build_group(kind, group_asked, tasks, size_tokens, essay=essay, **common)
  for m in memories:
    check_unambiguous(m)
  return memories


def _build_group(kind, asked, tasks, size_tokens: int, *, seed: int, split: Split,
                 docs_per_example: int, doc_chars: int, essay) -> list[Memory]:
  per_example = np.mean([_size(ex.docs) for _, ex in asked])
  per_memory = max(1, int((size_tokens // 2) // per_example))
  order = np.random.default_rng([seed, int(split), 23]).permutation(len(asked))
  groups = [order[s:s + per_memory] for s in range(0, len(asked), per_memory)]
  memories = []
  for g, group in enumerate(groups):
    rng = np.random.default_rng([seed, int(split), 29, size_tokens, g])
    texts: list[str] = [t for a in group for t in asked[a][1].docs]
    keys = [k for a in group for k in asked[a][1].keys]
    values = [v for a in group for v in asked[a][1].answers]
    total, f = _size(texts), 0
    start = 1_000_000 * (g + 1)  # disjoint from the asked examples and from other groups
    while total < size_tokens:
      if kind is None:  # filler examples, cycling through the tasks
        ex = synthetic.example(tasks[f % len(tasks)], seed=seed, split=split, index=start + f,
                               num_docs=docs_per_example, doc_chars=doc_chars)
        f += 1
        if _clashes(ex.keys, keys) or any(k in " ".join(ex.docs) for k in keys):
          continue  # a filler that would repeat an asked key
        docs = list(ex.docs)
      else:  # the haystack alone, 64 documents at a time
        variant = next(niah.Variant(t) for t, _ in asked if _haystack_kind(t) == kind)
        docs = niah.haystack_documents(variant, seed=seed, split=split, index=start + f,
                                       num_docs=64, doc_chars=doc_chars, protected_keys=keys,
                                       protected_values=values, essay=essay)
        f += 1
        while docs and total + _size(docs) > size_tokens + _size(docs[-1:]):
          docs.pop()  # stop near the target size
      texts += docs
      total += _size(docs)
    perm = rng.permutation(len(texts))
    new_id = np.empty(len(texts), np.int64)
    new_id[perm] = np.arange(len(texts))
    shuffled = tuple(texts[p] for p in perm)
    questions, first = [], 0  # first: where the asked example's documents start in `texts`
    for a in group:
      task, ex = asked[a]
      ids = lambda local, f=first: tuple(int(new_id[f + i]) for i in local)  # noqa: E731
      spec = niah.SPECS[niah.Variant(task)] if task.startswith("niah_") else None
      queried = ex.keys[:spec.queries] if spec else ()
      questions.append(Question(task=task, question=ex.question, answers=tuple(ex.answers),
                                gold=ids(ex.gold),
                                hops=tuple(ids(h) for h in ex.rounds),
                                keys=tuple(queried)))
      first += len(ex.docs)
    memories.append(Memory(texts=shuffled, questions=tuple(questions),
                           haystack=_kind_name(kind)))
  return memories
