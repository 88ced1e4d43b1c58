"""RULER's eight NIAH subtasks, served as MSA memory documents.

The haystack, keys, values, needle sentence and question follow RULER's `niah` generator and
template (scripts/data/synthetic/niah.py); only the "essay" haystack is our own generated prose
(`text.essay_sentence`) because the Paul Graham essays cannot be shipped.

Cutting the context into documents (RULER has no documents, so this rule is ours):
- The haystack is a stream of whole sentences: the noise unit's five sentences repeated, essay
  sentences, or distractor needles (same-type random keys and values, never a queried key).
- Needles are assigned to uniformly random documents, distinct ones while there are at least as
  many documents as needles (otherwise every document gets one and the rest share).
- Document d takes the next haystack sentences while it, counting its needles and one space
  between sentences, stays within doc_chars characters; the sentence that would overflow starts
  document d+1. A document holds at least one sentence, so it is longer than doc_chars only when a
  single sentence (or its needles alone) is. The needles then go at uniformly random sentence
  boundaries inside their document.
- Every document gets a distinct random id (shown to the model as "[id]. text"): its number of
  digits is uniform in id_digits, its value uniform among the numbers with that many digits.

A sample is a pure function of its arguments: it is drawn from
np.random.default_rng([seed, split, variant number, index]).
"""

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from msa_jax.data import text
from msa_jax.data.text import Split


class Variant(enum.Enum):
  SINGLE_1 = "niah_single_1"
  SINGLE_2 = "niah_single_2"
  SINGLE_3 = "niah_single_3"
  MULTIKEY_1 = "niah_multikey_1"
  MULTIKEY_2 = "niah_multikey_2"
  MULTIKEY_3 = "niah_multikey_3"
  MULTIVALUE = "niah_multivalue"
  MULTIQUERY = "niah_multiquery"


class Haystack(enum.Enum):
  NOISE = enum.auto()
  ESSAY = enum.auto()
  NEEDLE = enum.auto()  # distractor needles


class Kind(enum.Enum):
  """Type of a key or value."""
  WORDS = enum.auto()
  NUMBERS = enum.auto()
  UUIDS = enum.auto()


@dataclasses.dataclass(frozen=True)
class Spec:
  """One row of RULER's task table (keys = max(k, q), as RULER's generator uses it)."""
  haystack: Haystack
  key: Kind
  value: Kind
  keys: int
  values: int  # per key
  queries: int  # the first `queries` keys are asked about


SPECS = {
    Variant.SINGLE_1: Spec(Haystack.NOISE, Kind.WORDS, Kind.NUMBERS, 1, 1, 1),
    Variant.SINGLE_2: Spec(Haystack.ESSAY, Kind.WORDS, Kind.NUMBERS, 1, 1, 1),
    Variant.SINGLE_3: Spec(Haystack.ESSAY, Kind.WORDS, Kind.UUIDS, 1, 1, 1),
    Variant.MULTIKEY_1: Spec(Haystack.ESSAY, Kind.WORDS, Kind.NUMBERS, 4, 1, 1),
    Variant.MULTIKEY_2: Spec(Haystack.NEEDLE, Kind.WORDS, Kind.NUMBERS, 1, 1, 1),
    Variant.MULTIKEY_3: Spec(Haystack.NEEDLE, Kind.UUIDS, Kind.UUIDS, 1, 1, 1),
    Variant.MULTIVALUE: Spec(Haystack.ESSAY, Kind.WORDS, Kind.NUMBERS, 1, 4, 1),
    Variant.MULTIQUERY: Spec(Haystack.ESSAY, Kind.WORDS, Kind.NUMBERS, 4, 1, 4),
}

_MAKE: dict[Kind, Callable[[np.random.Generator], str]] = {
    Kind.WORDS: text.key_word, Kind.NUMBERS: text.number, Kind.UUIDS: text.uuid}
_VALUE_NAME = {Kind.NUMBERS: "number", Kind.UUIDS: "uuid"}


@dataclasses.dataclass(frozen=True)
class Example:
  """One retrieval question over a set of memory documents.

  gold indexes `docs` (ascending) and names the documents holding what the answer needs; hops
  (multi-hop tasks only) lists the gold indices to retrieve in each round, in order. answers are
  all the reference values (RULER's string_match_all); answer_text is what the model should write.
  """
  task: str
  docs: tuple[str, ...]
  doc_ids: tuple[int, ...]  # distinct positive ids, one per document
  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]
  answer_text: str
  hops: tuple[tuple[int, ...], ...] = ()
  keys: tuple[str, ...] = ()  # every needle key (NIAH); the queried ones come first

  @property
  def rounds(self) -> tuple[tuple[int, ...], ...]:
    """Gold document indices per retrieval round (NIAH: one round with every gold document)."""
    return self.hops if self.hops else (self.gold,)


def join_list(items: Sequence[str]) -> str:
  """RULER's list rendering: "a", "a and b", "a, b, and c"."""
  if len(items) <= 2:
    return " and ".join(items)
  return ", ".join(items[:-1]) + ", and " + items[-1]


def needle_sentence(key: str, value: str, value_kind: Kind) -> str:
  return f"One of the special magic {_VALUE_NAME[value_kind]}s for {key} is: {value}."


def question(keys: Sequence[str], value_kind: Kind, values_per_key: int) -> str:
  """RULER's question, in the singular when exactly one value is asked for."""
  name = _VALUE_NAME[value_kind]
  query = join_list(keys)
  if len(keys) * values_per_key == 1:
    return f"What is the special magic {name} for {query} mentioned in the provided text?"
  return f"What are all the special magic {name}s for {query} mentioned in the provided text?"


def draw_doc_ids(rng: np.random.Generator, n: int, id_digits: tuple[int, int]) -> tuple[int, ...]:
  """n distinct ids; digits uniform in [lo, hi] among digit counts with ids left, value uniform."""
  lo, hi = id_digits
  if not 1 <= lo <= hi:
    raise ValueError(f"id_digits must satisfy 1 <= lo <= hi, got {id_digits}")
  capacity = {d: 9 * 10 ** (d - 1) for d in range(lo, hi + 1)}
  if n > sum(capacity.values()):
    raise ValueError(f"{n} documents need more distinct ids than {id_digits} digits allow")
  used: set[int] = set()
  taken = {d: 0 for d in capacity}
  ids = []
  while len(ids) < n:
    # Excluding exhausted digit counts keeps the draw finite when small ranges fill up.
    open_ = [d for d in capacity if taken[d] < capacity[d]]
    d = open_[int(rng.integers(len(open_)))]
    v = int(rng.integers(10 ** (d - 1), 10 ** d))
    if v not in used:
      used.add(v)
      taken[d] += 1
      ids.append(v)
  return tuple(ids)


def _clashes(candidate: str, protected: Sequence[str]) -> bool:
  """Whether candidate equals, contains or is contained in a protected string.

  Substrings matter for word keys: a distractor "red-catalog" would contain the key "red-cat".
  """
  return any(candidate in p or p in candidate for p in protected)


def _fresh(rng: np.random.Generator, kind: Kind, split: Split, protected: Sequence[str]) -> str:
  while True:
    value = text.draw(_MAKE[kind], rng, split)
    if not _clashes(value, protected):
      return value


def _needle_haystack(rng: np.random.Generator, spec: Spec, split: Split, keys: Sequence[str],
                     values: Sequence[str]) -> Iterator[str]:
  """Endless distractor needles: same key/value types, never a real key or value."""
  while True:
    key = _fresh(rng, spec.key, split, keys)
    value = _fresh(rng, spec.value, split, values)
    yield needle_sentence(key, value, spec.value)


def _haystack(rng: np.random.Generator, spec: Spec, split: Split, keys: Sequence[str],
              values: Sequence[str], essay: Sequence[str] | None = None) -> Iterator[str]:
  if spec.haystack is Haystack.NOISE:
    return itertools.cycle(text.split_sentences(text.NOISE))
  if spec.haystack is Haystack.ESSAY:
    if essay is None:
      return text.essay_sentences(rng)
    if not essay:
      raise ValueError("an essay haystack needs at least one sentence")
    # Real prose: its sentences in order, from a random place, round and round.
    start = int(rng.integers(len(essay)))
    return itertools.cycle(list(essay[start:]) + list(essay[:start]))
  return _needle_haystack(rng, spec, split, keys, values)


def haystack_documents(variant: Variant, *, seed: int, split: Split, index: int, num_docs: int,
                       doc_chars: int, protected_keys: Sequence[str] = (),
                       protected_values: Sequence[str] = (),
                       essay: Sequence[str] | None = None) -> list[str]:
  """num_docs documents of the variant's haystack alone (no needle of an asked key): noise,
  essay prose (generated, or the sentences of `essay`), or distractor needles whose keys and
  values clash with none of the protected ones. A pure function of its arguments."""
  spec = SPECS[variant]
  rng = np.random.default_rng([seed, int(split), list(Variant).index(variant), index, 1])
  stream = _haystack(rng, spec, split, protected_keys, protected_values, essay)
  return text.pack_documents(stream, [[] for _ in range(num_docs)], doc_chars, rng)


def assign_documents(rng: np.random.Generator, n_items: int, num_docs: int) -> list[int]:
  """A document index per item: distinct while n_items <= num_docs, else every document first."""
  order = rng.permutation(num_docs).tolist()
  if n_items <= num_docs:
    return order[:n_items]
  return order + rng.integers(num_docs, size=n_items - num_docs).tolist()


def example(variant: Variant, *, seed: int, split: Split, index: int, num_docs: int,
            doc_chars: int, id_digits: tuple[int, int] = (1, 6), protected: Sequence[str] = (),
            essay: Sequence[str] | None = None) -> Example:
  """The index-th sample of a NIAH variant: num_docs documents of about doc_chars characters.

  protected: keys of other examples sharing a memory; this example's keys and its distractor
    needles avoid them (draws only change where they would have clashed).
  essay: sentences of real prose replacing the generated essay haystack.
  """
  if num_docs < 1:
    raise ValueError(f"num_docs must be >= 1, got {num_docs}")
  spec = SPECS[variant]
  rng = np.random.default_rng([seed, int(split), list(Variant).index(variant), index])

  keys: list[str] = []
  for _ in range(spec.keys):
    keys.append(_fresh(rng, spec.key, split, keys + list(protected)))
  values: list[str] = []
  needles: list[tuple[str, str]] = []
  for key in keys:
    for _ in range(spec.values):
      values.append(_fresh(rng, spec.value, split, values))
      needles.append((key, values[-1]))
  queried = keys[:spec.queries]

  where = assign_documents(rng, len(needles), num_docs)
  inserts: list[list[str]] = [[] for _ in range(num_docs)]
  for (key, value), d in zip(needles, where):
    inserts[d].append(needle_sentence(key, value, spec.value))
  docs = text.pack_documents(_haystack(rng, spec, split, keys + list(protected), values, essay),
                             inserts, doc_chars, rng)

  answers = tuple(v for k, v in needles if k in queried)
  gold = tuple(sorted({d for (k, _), d in zip(needles, where) if k in queried}))
  return Example(
      task=variant.value,
      docs=tuple(docs),
      doc_ids=draw_doc_ids(rng, num_docs, id_digits),
      question=question(queried, spec.value, spec.values),
      answers=answers,
      gold=gold,
      answer_text=join_list(answers),
      keys=tuple(keys))
