"""Examples rendered in the MSA prompt format (SPEC §10), one retrieval step per training sample.

Memory documents are `<|im_start|>[id]. text[id]<|im_end|>`. The active context of a request is

  query (role 0):  "\\nPlease answer the question based on the above historical document
                    information\\n\\n{question}\\nPlease return all documents related to the question\\n"
  tail (role -1):  "<|im_end|>\\n<|im_start|>"

followed by retrieval rounds. In round r the model generates `[id]...[id]<|object_ref_end|>`; the
system appends `[id]. text\\n...<|object_ref_end|>` (that text routes: role 0, as the official
engine re-routes on question + newly appended text). After the last round the model generates
`<End-of-Retrieve>`, the system appends `<|im_start|>The user's question is: {question}\\n
<|object_ref_end|>` and the model writes `The answer to the question is: {answer}<|im_end|>`.

A training sample with r rounds done holds the context up to round r and, as its target, what the
model must generate next: round r's ids, or (r = number of rounds) the end marker and the answer.
Only generated text is labelled.

The official service wraps the question in two constant instruction sentences ("Please answer the
question based on the above historical document information" ... "Please return all documents
related to the question"), 135 byte tokens per request. Our models are trained from scratch on
this format, where the sentences carry no information, so `prompt` leaves them out (`OFFICIAL_HEAD`
and `OFFICIAL_TAIL` keep the official text for models trained with it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msa_jax.data.tokenizer import Special, Tokenizer
from msa_jax.math import roles
from msa_jax.math.losses import IGNORE_INDEX

OFFICIAL_HEAD = "\nPlease answer the question based on the above historical document information\n\n"
OFFICIAL_TAIL = "\nPlease return all documents related to the question\n"
QUERY_HEAD = ""
QUERY_TAIL = "\n"
ANSWER_LEAD = "The answer to the question is: "
RESTATE = "The user's question is: "


def doc_text(doc_id: int, text: str) -> str:
  """A memory document as stored in the bank (official `compose_input`)."""
  return f"<|im_start|>[{doc_id}]. {text}[{doc_id}]<|im_end|>"


def ids_text(doc_ids) -> str:
  """What the model generates in a retrieval round: `[a][b]<|object_ref_end|>`."""
  return "".join(f"[{i}]" for i in doc_ids) + "<|object_ref_end|>"


def injected_text(doc_ids, texts) -> str:
  """What the system appends after a round: the documents' original text."""
  return "".join(f"[{i}]. {t}\n" for i, t in zip(doc_ids, texts)) + "<|object_ref_end|>"


def restate_text(question: str) -> str:
  return f"<|im_start|>{RESTATE}{question}\n<|object_ref_end|>"


def answer_text(answer: str) -> str:
  return f"{ANSWER_LEAD}{answer}<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Active:
  """Active tokens of one sample: ids, roles (0 routes, -1 not), labelled and answer [A] (bool).

  `answer` marks the answer sentence (the tokens of SPEC §7's answer loss).
  """

  ids: np.ndarray
  roles: np.ndarray
  labelled: np.ndarray
  answer: np.ndarray | None = None

  def __post_init__(self):
    if self.answer is None:
      object.__setattr__(self, "answer", np.zeros(self.ids.size, bool))

  def __add__(self, other: "Active") -> "Active":
    return Active(*(np.concatenate([getattr(self, f), getattr(other, f)])
                    for f in ("ids", "roles", "labelled", "answer")))


def _part(tok: Tokenizer, text: str, role: int, labelled: bool, answer: bool = False) -> Active:
  ids = tok.encode(text).astype(np.int32)
  return Active(ids, np.full(ids.size, role, np.int32), np.full(ids.size, labelled),
                np.full(ids.size, answer))


def prompt(tok: Tokenizer, question: str) -> Active:
  """The request before any retrieval round: query (routes) + chat tail."""
  return (_part(tok, QUERY_HEAD + question + QUERY_TAIL, roles.QUERY, False)
          + _part(tok, "<|im_end|>\n<|im_start|>", roles.ACTIVE, False))


def round_context(tok: Tokenizer, ids, texts, *, generated_labelled: bool, routes: bool) -> Active:
  """One finished round: generated ids (optionally labelled) + injected text (routing or not)."""
  return (_part(tok, ids_text(ids), roles.ACTIVE, generated_labelled)
          + _part(tok, injected_text(ids, texts), roles.QUERY if routes else roles.ACTIVE, False))


def final(tok: Tokenizer, question: str, answer: str, *, label_restated: bool = False) -> Active:
  """End of retrieval, the restated question (injected) and the answer.

  label_restated: also label the injected restated question — a copy of the question, which
  gives a from-scratch model a dense signal for learning to copy from its context.
  """
  return (_part(tok, "<End-of-Retrieve>", roles.ACTIVE, True)
          + _part(tok, restate_text(question), roles.ACTIVE, label_restated)
          + _part(tok, answer_text(answer), roles.ACTIVE, True, answer=True))


def training_active(tok: Tokenizer, question: str, answer: str, rounds: list[tuple[list[int], list[str]]],
                    rounds_done: int, *, label_restated: bool = False) -> Active:
  """Active tokens of the sample with `rounds_done` of `rounds` (ids, texts) already in context.

  Only the most recent injected text routes (with the question), as in the official engine.
  """
  a = prompt(tok, question)
  for r in range(rounds_done):
    ids, texts = rounds[r]
    a = a + round_context(tok, ids, texts, generated_labelled=False, routes=r == rounds_done - 1)
  if rounds_done < len(rounds):
    return a + _part(tok, ids_text(rounds[rounds_done][0]), roles.ACTIVE, True)
  return a + final(tok, question, answer, label_restated=label_restated)


def labels_of(active: Active) -> np.ndarray:
  """HF-style labels [A]: the token itself where labelled, else -100."""
  return np.where(active.labelled, active.ids, IGNORE_INDEX).astype(np.int32)


def answer_labels_of(active: Active) -> np.ndarray:
  """HF-style labels [A] of the answer sentence only (the answer loss)."""
  return np.where(active.labelled & active.answer, active.ids, IGNORE_INDEX).astype(np.int32)


def render_docs(tok: Tokenizer, doc_ids, texts) -> list[np.ndarray]:
  return [tok.encode(doc_text(i, t)).astype(np.int32) for i, t in zip(doc_ids, texts)]


def closing_id_labels(tok: Tokenizer, doc_id: int, tokens: np.ndarray) -> np.ndarray:
  """HF-style labels of a rendered document: its closing `[id]`'s digits and `]` only.

  Predicting them needs the id from the document's start, so this loss teaches every document
  token to carry its document's id — what the model must read from pooled memory to name it.
  """
  closing = tok.encode(f"[{doc_id}]<|im_end|>")
  n = tokens.size
  if not np.array_equal(tokens[n - closing.size:], closing):
    raise ValueError(f"document {doc_id} does not end in its closing id")
  labels = np.full(n, IGNORE_INDEX, np.int32)
  labels[n - closing.size + 1:n - 1] = tokens[n - closing.size + 1:n - 1]
  return labels
