"""Dense copy rows: the in-context copying that answering from retrieved text needs.

Answering an MSA question means finding the question's key in the pasted documents and copying
what follows it — an induction (match-and-copy) mechanism. In MSA batches only a few percent of
the tokens carry that signal, and a model trained from scratch on them does not form the
mechanism within a CPU budget (BUILD_NOTES.md "Training"). Copy rows make every labelled token a
copy:

- `RowKind.SPAN`: units `span \\n filler \\n span \\n`, the second span labelled; spans are 16-40
  bytes of words, digits or hex, fillers 0-40 bytes of prose, so the offset between the copies
  varies and position alone predicts nothing.
- `RowKind.LOOKUP`: an answer step of a NIAH example in the MSA format (`render.training_active`)
  with the example's short documents pasted in shuffled order: restated question and answer
  labelled — copying the value that follows the key, among distractor documents. With
  `hop_fraction`, that share of LOOKUP rows is a multi-hop example instead (its gold documents of
  every hop and 1-2 hard-negative documents pasted): the answer is found only by matching the
  question to one document and that document's bridge entity (or variable) to the next.

Row `index` is a pure function of (seed, split, index); SPAN strings and LOOKUP keys/values obey
the train/test string split (`text.split_of`).
"""

from __future__ import annotations

import dataclasses
import enum
import string

import numpy as np

from msa_jax.data import niah, render, synthetic, text
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.math import roles
from msa_jax.math.losses import IGNORE_INDEX


class RowKind(enum.Enum):
  SPAN = "span"
  LOOKUP = "lookup"


@dataclasses.dataclass(frozen=True)
class Row:
  """ids, roles, labels [n] (HF style: labels[t] is predicted at t-1, -100 = ignore)."""

  kind: RowKind
  ids: np.ndarray
  roles: np.ndarray
  labels: np.ndarray


def _span(rng: np.random.Generator) -> str:
  n = int(rng.integers(16, 41))
  style = int(rng.integers(3))
  if style == 0:
    words = []
    while sum(len(w) + 1 for w in words) < n:
      words.append(text.key_word(rng).split("-")[int(rng.integers(2))])
    return " ".join(words)[:n].strip()
  alphabet = string.digits if style == 1 else "0123456789abcdef"
  return "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=n))


def _filler(rng: np.random.Generator) -> str:
  n = int(rng.integers(0, 41))
  return text.essay_sentence(rng)[:n]


def span_row(tok: Tokenizer, rng: np.random.Generator, split: Split, length: int,
             units: int | None = None) -> Row:
  """SPAN units until the row holds `length` tokens (the last unit is cut), or `units` of them.

  With `units` the row may be shorter than `length`; the batch pads it.
  """
  if units is not None and units < 1:
    raise ValueError(f"span units per row must be >= 1 or None, got {units}")
  ids, labels, n = [], [], 0
  while len(ids) < length and (units is None or n < units):
    n += 1
    span = text.draw(_span, rng, split)
    first = tok.encode(f"{span}\n{_filler(rng)}\n").tolist()
    again = tok.encode(f"{span}\n").tolist()
    ids += first + again
    # The first byte of the repeat is not predictable (the filler may go on); the rest is a copy.
    labels += [IGNORE_INDEX] * (len(first) + 1) + again[1:]
  ids, labels = np.asarray(ids[:length], np.int32), np.asarray(labels[:length], np.int32)
  # One routing token: the memory forward needs a query; it routes over the dummy memory.
  role = np.full(ids.size, roles.ACTIVE, np.int32)
  role[0] = roles.QUERY
  return Row(RowKind.SPAN, ids, role, labels)


def lookup_row(tok: Tokenizer, rng: np.random.Generator, split: Split, seed: int, index: int,
               task: str, num_docs: int, doc_chars: int) -> Row:
  """The answer step of `synthetic.example(task, ...)` with all its documents pasted, shuffled."""
  ex = synthetic.example(task, seed=seed, split=split, index=index, num_docs=num_docs,
                         doc_chars=doc_chars)
  order = rng.permutation(len(ex.docs))
  rounds = [([ex.doc_ids[j] for j in order], [ex.docs[j] for j in order])]
  act = render.training_active(tok, ex.question, ex.answer_text, rounds, 1, label_restated=True)
  return Row(RowKind.LOOKUP, act.ids.astype(np.int32), act.roles.astype(np.int32),
             render.labels_of(act))


@dataclasses.dataclass(frozen=True)
class CopySpec:
  """A stream of copy batches; each batch is all SPAN or all LOOKUP rows.

  One kind per batch because LOOKUP rows are 4-6 times longer than SPAN rows and a batch is
  padded to its longest row; the row counts make both kinds cost about the same.
  """

  span_rows: int = 32
  span_length: int = 128  # tokens of a SPAN row (at most, with span_units)
  # SPAN units per row; None packs units until the row is full. With one unit per row no earlier
  # span competes with the one to copy (the setting under which copying first formed).
  span_units: int | None = None
  lookup_rows: int = 8
  lookup_fraction: float = 0.5  # share of LOOKUP batches
  lookup_docs: tuple[int, int] = (2, 3)  # documents pasted in a LOOKUP row, inclusive range
  lookup_doc_chars: int = 60
  # One or two needles per row keeps LOOKUP rows near 350-800 tokens; multi-value/multi-query
  # answers (4 values) are the MSA batches' job.
  variants: tuple[niah.Variant, ...] = tuple(v for v in niah.Variant if v.value.startswith(
      ("niah_single", "niah_multikey")))
  # Share of LOOKUP rows drawn from `hop_tasks` (names as in `synthetic`) instead of `variants`;
  # their documents are longer because a fact sentence alone is up to ~60 bytes.
  hop_fraction: float = 0.0
  hop_tasks: tuple[str, ...] = ("bridge", "chain_2", "chain_3")
  hop_doc_chars: int = 96
  seed: int = 0
  split: Split = Split.TRAIN

  def __post_init__(self):
    if not 0 <= self.hop_fraction <= 1:
      raise ValueError(f"hop_fraction must be in [0, 1], got {self.hop_fraction}")
    object.__setattr__(self, "hop_tasks", tuple(self.hop_tasks))
    for name in self.hop_tasks:
      if synthetic.hops_of(name) < 2:
        raise ValueError(f"hop_tasks holds {name!r}, which is not a multi-hop task")


def _rng(spec: CopySpec, step: int) -> np.random.Generator:
  return np.random.default_rng([spec.seed, int(spec.split), 11, step])


def batch_kind(spec: CopySpec, step: int) -> RowKind:
  """The kind of copy batch `step` (its rng's first draw, as in `rows`)."""
  return RowKind.LOOKUP if _rng(spec, step).random() < spec.lookup_fraction else RowKind.SPAN


def _lookup(tok: Tokenizer, spec: CopySpec, rng: np.random.Generator, index: int) -> Row:
  lo, hi = spec.lookup_docs
  num_docs = int(rng.integers(lo, hi + 1))
  # No draw for the hop share when it is 0, so NIAH-only streams stay what they were.
  if spec.hop_fraction > 0 and rng.random() < spec.hop_fraction:
    task = spec.hop_tasks[int(rng.integers(len(spec.hop_tasks)))]
    num_docs = synthetic.hops_of(task) + num_docs - lo + 1  # every hop plus 1-2 hard negatives
    doc_chars = spec.hop_doc_chars
  else:
    task = spec.variants[int(rng.integers(len(spec.variants)))].value
    doc_chars = spec.lookup_doc_chars
  return lookup_row(tok, rng, spec.split, spec.seed + 1, index, task, num_docs, doc_chars)


def rows(tok: Tokenizer, spec: CopySpec, step: int) -> list[Row]:
  """The rows of copy batch `step` (a pure function of spec and step)."""
  rng = _rng(spec, step)
  if rng.random() >= spec.lookup_fraction:
    return [span_row(tok, rng, spec.split, spec.span_length, spec.span_units)
            for _ in range(spec.span_rows)]
  return [_lookup(tok, spec, rng, step * spec.lookup_rows + r) for r in range(spec.lookup_rows)]
