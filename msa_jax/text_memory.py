"""Documents in, answers out: a memory of texts over an on-disk bank.

The path behind `msa-jax encode` (for text), `msa-jax ask` and `msa-jax bank`, as a facade for
notebooks; the pure functions (`engine.encode`, `engine.interleave`, `memory.store`) stay
underneath and reachable::

  from msa_jax.text_memory import TextMemory
  mem = TextMemory.open("bank/")            # the shipped NIAH model; the bank is made on first add
  mem.add_path("notes/")                    # .txt / .md / .jsonl, split to the model's documents
  ids = mem.add(["One of the special magic numbers for quiet-river is: 4172."])
  ans = mem.ask("What is the special magic number for quiet-river mentioned in the provided text?")
  ans.answer, ans.rounds[0].documents[0].id, ans.rounds[0].documents[0].score, ans.latency_s

Documents are rendered in the memory format of SPEC §10 (`<|im_start|>[id]. text[id]<|im_end|>`,
`msa_jax.data.render.doc_text`) with the id the bank gives them, so the model can name them in
Memory Interleave; their original text and title are kept in the bank (`store.read_texts`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from msa_jax import demo
from msa_jax.data import render
from msa_jax.data.documents import Split, SplitKind, TextDoc, read_documents, split_text
from msa_jax.data.tokenizer import SPECIAL_TEXT, Tokenizer, load_tokenizer
from msa_jax.engine import encode, interleave
from msa_jax.engine.interleave import Naming
from msa_jax.memory import store
from msa_jax.memory.bank import BankSpec
from msa_jax.nn.model import MSAForCausalLM, weights_fingerprint

PathLike = str | os.PathLike
# Names a checkpoint argument may give instead of a directory: the shipped models.
SHIPPED = {"niah": demo.Shipped.NIAH, "demo": demo.Shipped.NIAH,
           "multihop": demo.Shipped.MULTIHOP}
_RENDER_VERSION = "msa-jax text documents v1"  # bump if render.doc_text changes


class TextMemoryError(ValueError):
  """Input that the text path cannot take (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How `ask` runs Memory Interleave (see `interleave.Naming`)."""

  naming: Naming
  max_rounds: int
  router_docs: int = 1


@dataclasses.dataclass(frozen=True)
class Model:
  """A checkpoint ready for the text path: the model, its tokenizer and how it was trained."""

  model: MSAForCausalLM
  tok: Tokenizer
  name: str
  doc_chars: int | None  # the document size it was trained on, when its training.json says
  protocol: Protocol     # the interleave protocol it was trained for

  @property
  def default_split(self) -> Split:
    """Pieces of the trained document size when known, else paragraphs."""
    return (Split(SplitKind.CHARS, self.doc_chars) if self.doc_chars
            else Split(SplitKind.PARAGRAPH))


def checkpoint_dir(checkpoint: PathLike | None) -> pathlib.Path:
  """None or "niah"/"demo": the shipped NIAH model; "multihop": the multi-hop one; else a path."""
  if checkpoint is None:
    return demo.path(demo.Shipped.NIAH)
  if str(checkpoint) in SHIPPED:
    return demo.path(SHIPPED[str(checkpoint)])
  return pathlib.Path(checkpoint)


def float32_params(params):
  """Floating-point leaves as float32 (the command line and the text path run in float32)."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)


def load_model(checkpoint: PathLike | None = None, tokenizer: PathLike | None = None) -> Model:
  """Loads a checkpoint (float32) with its tokenizer (`tokenizer.json` in the checkpoint, or
  `tokenizer` to override it)."""
  from msa_jax.interop import hf
  from msa_jax.nn.model import from_params

  d = checkpoint_dir(checkpoint)
  cfg, params = hf.load_checkpoint(d)
  params = float32_params(params)
  try:
    tok = load_tokenizer(tokenizer if tokenizer is not None else d)
  except ValueError as e:
    if tokenizer is not None:
      raise TextMemoryError(f"cannot read --tokenizer {tokenizer}: {e}") from None
    raise TextMemoryError(f"{d} has no usable tokenizer.json ({e}); give one with --tokenizer"
                          ) from None
  doc_chars, protocol = None, Protocol(Naming.ROUTER, max_rounds=1)
  training = d / "training.json"
  if training.is_file():
    data = json.loads(training.read_text()).get("data", {})
    doc_chars = data.get("doc_chars")
    # Models trained on multi-hop chains decide when retrieval ends (Naming.ROUTER_UNTIL_END).
    if any(t in str(data.get("tasks", "")) for t in ("bridge", "chain")):
      protocol = Protocol(Naming.ROUTER_UNTIL_END, max_rounds=3)
  return Model(from_params(cfg, params), tok, str(checkpoint or "niah"), doc_chars, protocol)


# --- answers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """A document routed in a round: its id, its best routing score over router layers."""

  id: int
  score: float
  title: str | None = None
  text: str | None = None
  appended: bool = False  # its text was pasted into the context (Memory Interleave)


@dataclasses.dataclass(frozen=True)
class Round:
  documents: tuple[Retrieved, ...]


@dataclasses.dataclass(frozen=True)
class Answer:
  question: str
  answer: str
  rounds: tuple[Round, ...]
  latency_s: float

  def to_json(self) -> dict:
    """The `msa-jax ask --json` object."""
    return {"question": self.question, "answer": self.answer,
            "rounds": [{"documents": [{"id": d.id, "score": d.score} for d in r.documents]}
                       for r in self.rounds],
            "latency_s": self.latency_s}


def _round(r: interleave.Round, texts: dict[int, store.DocText]) -> Round:
  best: dict[int, float] = {}
  for l, ids in r.selected.items():
    for i, s in zip(ids, r.scores[l]):
      best[i] = max(best.get(i, -np.inf), float(s))
  order = sorted(best, key=lambda i: (-best[i], i))
  docs = []
  for i in order:
    t = texts.get(i, store.DocText(None))
    docs.append(Retrieved(int(i), best[i], t.title, t.text, i in r.doc_ids))
  return Round(tuple(docs))


# --- the memory ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Added:
  """What an add did: the ids of the input's documents and how many were already there."""

  ids: tuple[int, ...]
  resumed_from: int
  live_docs: int


def input_sha256(docs: Sequence[TextDoc], ids: Sequence[int]) -> str:
  """Fingerprint of a text input: its documents' texts, titles and ids, and the render format."""
  body = json.dumps([_RENDER_VERSION] + [[d.text, d.title, int(i)] for d, i in zip(docs, ids)],
                    ensure_ascii=False)
  return hashlib.sha256(body.encode()).hexdigest()


class TextMemory:
  """A bank of text documents and the model that reads it."""

  def __init__(self, path: PathLike, model: Model, *, dtype: str = "float32",
               shard_docs: int = 1024):
    self.path, self.m, self.dtype, self.shard_docs = pathlib.Path(path), model, dtype, shard_docs
    self._runner = None

  @classmethod
  def open(cls, path: PathLike, checkpoint: PathLike | None = None, *,
           tokenizer: PathLike | None = None, **kw) -> "TextMemory":
    """The memory at `path` (created by the first add) with a checkpoint (default: the shipped
    NIAH model). An existing bank must have been built for the same model."""
    mem = cls(path, load_model(checkpoint, tokenizer), **kw)
    if (mem.path / store.MANIFEST).exists():
      mem.dtype = store.read_manifest(mem.path)[1].dtype
      store.check_model(mem.path, mem.spec, mem.weights_sha256)
    return mem

  @property
  def spec(self) -> BankSpec:
    return BankSpec.for_model(self.m.model.cfg, self.dtype)

  @functools.cached_property
  def weights_sha256(self) -> str:
    return weights_fingerprint(self.m.model)

  def _changed(self) -> None:
    self._runner = None

  # --- writing ---

  def _render(self, docs: Sequence[TextDoc], ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """tokens [M, Lmax] (-1 padded), lengths [M] of the documents in the memory format."""
    rows = [self.m.tok.encode(render.doc_text(int(i), d.text)) for d, i in zip(docs, ids)]
    context = self.m.model.cfg.max_position_embeddings
    for d, i, r in zip(docs, ids, rows):
      if r.size > context:
        where = f"{d.title!r}" if d.title else f"id {int(i)}"
        raise TextMemoryError(f"document {where} is {r.size} tokens, more than the model's "
                              f"{context} positions: split it (--split chars:N)")
    lengths = np.array([r.size for r in rows], np.int64)
    tokens = np.full((len(rows), max(1, int(lengths.max(initial=1)))), -1, np.int64)
    for k, r in enumerate(rows):
      tokens[k, :r.size] = r
    return tokens, lengths

  def add_documents(self, docs: Sequence[TextDoc], *, append: bool = True,
                    log: bool = False) -> Added:
    """Encodes documents into the bank, resumably (see `encode.encode_to_bank`): the same input
    again continues or does nothing. Ids: the documents' own when every one has an id (none may
    be live), else the next free ids. append=False refuses a bank that holds other documents.
    log: print encoding progress (documents, tokens, rate) to stderr."""
    docs = list(docs)
    if not docs:
      raise TextMemoryError("no documents to add")
    given = [d.id for d in docs]
    if any(i is None for i in given) and any(i is not None for i in given):
      raise TextMemoryError("either every document has an id or none has")
    if given[0] is not None:
      ids = [int(i) for i in given]
    else:  # the ids an earlier run of this input used, else the bank's next free ones
      first = self._first_id(docs)
      ids = list(range(first, first + len(docs)))
    sha = input_sha256(docs, ids)
    tokens, lengths = self._render(docs, ids)
    progress = encode.Progress(len(docs), int(lengths.sum())) if log else None
    try:
      done = encode.encode_to_bank(
          self.m.model, tokens, lengths, self.path, dtype=self.dtype, shard_docs=self.shard_docs,
          append=append, texts=[d.text for d in docs], titles=[d.title for d in docs],
          doc_ids=np.asarray(ids, np.int64), input_sha256=sha, progress=progress)
    finally:
      self._changed()
    return Added(tuple(ids), done.resumed_from, done.bank_docs)

  def _first_id(self, docs: Sequence[TextDoc]) -> int:
    if not (self.path / store.MANIFEST).exists():
      return 0
    m, _ = store.read_manifest(self.path)
    for r in m.get("inputs", []):  # a run of this input before: resume with its ids
      first = r["first_id"]
      if r["num_docs"] == len(docs) and r["sha256"] == input_sha256(
          docs, range(first, first + len(docs))):
        return first
    return m["next_doc_id"]

  def add(self, texts: Sequence[str], titles: Sequence[str | None] | None = None, *,
          ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """Adds texts as documents (one each, as given); returns their ids."""
    if isinstance(texts, str):
      raise TextMemoryError("add takes a list of texts")
    titles = [None] * len(texts) if titles is None else list(titles)
    ids = [None] * len(texts) if ids is None else list(ids)
    if not len(titles) == len(ids) == len(texts):
      raise TextMemoryError("texts, titles and ids differ in length")
    return self.add_documents([TextDoc(t, h, i) for t, h, i in zip(texts, titles, ids)]).ids

  def read_path(self, path: PathLike, split: Split | None = None) -> list[TextDoc]:
    """The documents of a .jsonl / .txt / .md file or a directory of them.

    split None: text, and JSONL records without an "id", are cut into pieces of the model's
    trained document size (`Model.default_split`: the shipped models answer from ~160-character
    documents and fail on much longer ones); a record that names its id stays one document.
    """
    if split is not None:
      return read_documents(path, split)
    docs = read_documents(path, None)
    if not self.m.doc_chars:
      return docs
    return [piece for d in docs for piece in (
        [d] if d.id is not None else
        [TextDoc(t, d.title) for t in split_text(d.text, self.m.default_split)])]

  def add_path(self, path: PathLike, split: Split | None = None, *, append: bool = True,
               log: bool = False) -> Added:
    """Adds the documents of `read_path(path, split)`."""
    return self.add_documents(self.read_path(path, split), append=append, log=log)

  def replace(self, docs: Sequence[TextDoc]) -> tuple[int, ...]:
    """Replaces live documents (each `TextDoc` names its id) by new texts."""
    docs = list(docs)
    if not docs or any(d.id is None for d in docs):
      raise TextMemoryError("replace needs documents that name the id they replace")
    ids = [int(d.id) for d in docs]
    tokens, lengths = self._render(docs, ids)
    enc = encode.encode_documents(self.m.model, tokens, lengths,
                                  dtype=_np_dtype(self.dtype))
    try:
      store.replace_documents(self.path, enc, ids, texts=[d.text for d in docs],
                              titles=[d.title for d in docs])
    finally:
      self._changed()
    return tuple(ids)

  def delete(self, ids: Sequence[int]) -> None:
    try:
      store.delete_documents(self.path, list(ids))
    finally:
      self._changed()

  def compact(self, max_shard_docs: int | None = None) -> int:
    """Drops deleted documents from disk; returns how many rows were removed."""
    try:
      return store.compact(self.path, max_shard_docs=max_shard_docs)
    finally:
      self._changed()

  # --- reading ---

  def texts(self) -> dict[int, store.DocText]:
    return store.read_texts(self.path)

  def info(self) -> dict:
    return bank_info(self.path)

  def runner(self):
    """The `BankRunner` over the bank as it is now (rebuilt after a write)."""
    from msa_jax.engine.run import BankRunner
    if self._runner is None:
      bank = store.open_bank(self.path, spec=self.spec, weights_sha256=self.weights_sha256)
      self._runner = BankRunner(self.m.model, bank)
    return self._runner

  def ask(self, questions: str | Sequence[str], *, protocol: Protocol | None = None,
          max_new_tokens: int = 96) -> Answer | list[Answer]:
    """Answers each question through Memory Interleave over the bank, one at a time (latency is
    per question; the first question is run once before timing, so compilation is excluded).
    A single string gives one `Answer`, a list a list."""
    single = isinstance(questions, str)
    qs = [questions] if single else list(questions)
    if not qs:
      return []
    protocol = protocol or self.m.protocol
    model, tok = self.m.model, self.m.tok
    runner = self.runner()
    template = runner.bank.template.tokens.size if runner.bank.template else 0
    start = model.cfg.msa.top_k_docs + template
    context = model.cfg.max_position_embeddings
    for q in qs:
      if not q.strip():
        raise TextMemoryError("a question is empty")
      n = render.prompt(tok, q).ids.size
      if start + n + max_new_tokens > context:
        raise TextMemoryError(f"a question of {n} tokens (+{max_new_tokens} new) does not fit "
                              f"the model's {context} positions: {q[:60]!r}")
    texts = self.texts()
    generate = interleave.runner_fn(runner)

    def once(q: str) -> interleave.Trace:
      return interleave.run(generate, tok, [q], {i: t.text for i, t in texts.items()
                                                 if t.text is not None},
                            start_position=start, max_rounds=protocol.max_rounds,
                            naming=protocol.naming, router_docs=protocol.router_docs,
                            max_answer_tokens=max_new_tokens)[0]

    out = [Answer(q, clean_answer(trace.answer), tuple(_round(r, texts) for r in trace.rounds),
                  round(latency, 4)) for q, (trace, latency) in zip(qs, interleave.timed(once, qs))]
    return out[0] if single else out


def bank_info(path: PathLike) -> dict:
  """Documents, chunks, bytes per tier, the model it was built for and the generation."""
  m, spec = store.read_manifest(path)
  tiers = {"routing_keys": 0, "content_kv": 0, "texts": 0, "other": 0}
  entries = [f for s in m["shards"] for f in s["files"].items()]
  if m["template"]:
    entries += list(m["template"]["files"].items())
  for name, e in entries:
    tier = ("routing_keys" if name.startswith("routing_keys") else
            "content_kv" if name.startswith(("keys", "values")) else
            "texts" if name == store.TEXTS else "other")
    tiers[tier] += e["bytes"]
  return {"path": str(path), "live_docs": m["num_live_docs"], "stored_docs": m["num_docs"],
          "chunks": m["num_chunks"], "shards": len(m["shards"]), "bytes": tiers,
          "model": {"config_fingerprint": spec.config_fingerprint,
                    "weights_sha256": m.get("weights_sha256"),
                    "router_layers": list(spec.router_layers), "dtype": spec.dtype},
          "generation": m["generation"], "next_doc_id": m["next_doc_id"],
          "inputs": len(m.get("inputs", []))}


def clean_answer(answer: str) -> str:
  """The answer up to the first control string: what follows it is not part of the answer."""
  for t in SPECIAL_TEXT.values():
    answer = answer.split(t, 1)[0]
  return answer.strip()


def _np_dtype(dtype: str):
  import ml_dtypes
  return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
