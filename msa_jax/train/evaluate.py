"""End-to-end evaluation on held-out synthetic tasks through the inference engine.

Each group of `group` held-out examples shares one memory (their documents, re-numbered with
fresh ids, exactly as a training batch is built), which is encoded into a bank once (stage 1).
Every question then runs the full Memory Interleave protocol through the engine (stages 2-3):
the model names documents (or, with `Naming.ROUTER`, the router's best documents are named for
it), their text is appended, and the model answers.

Metrics per task:
- accuracy: RULER `string_match_all` — the fraction of reference values found (case-insensitive)
  in the answer, averaged over questions;
- exact: the fraction of answers that are exactly the reference answer text (RULER's metric
  also credits an answer that lists extra values; this one does not);
- recall: the fraction of gold documents among the top-k routed documents of the first round
  (averaged over router layers), i.e. document recall@k of the router;
- retrieved_recall: the fraction of gold documents named (their text was appended);
- docs: the mean number of documents named per question.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from msa_jax.data import niah, render, synthetic
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.engine import interleave
from msa_jax.engine.encode import encode_documents
from msa_jax.engine.run import BankRunner, ContentPath
from msa_jax.memory.bank import BankSpec, MemoryBank
from msa_jax.nn.model import MSAForCausalLM
from msa_jax.studies.stats import exact_match, string_match_all
from msa_jax.train import batches
from msa_jax.train.forward import memory_forward


@dataclasses.dataclass(frozen=True)
class TaskResult:
  task: str
  n: int
  accuracy: float
  exact: float
  recall: float
  retrieved_recall: float
  docs: float
  memory_docs: int  # documents in each memory
  memory_tokens: float  # mean tokens per memory

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def build_memory(model: MSAForCausalLM, tok: Tokenizer, examples, rng: np.random.Generator,
                 id_digits=(1, 6)):
  """One bank holding every example's documents under fresh distinct ids.

  Returns (bank, texts by id, per-example gold ids, total tokens).
  """
  texts_list = [t for ex in examples for t in ex.docs]
  ids = niah.draw_doc_ids(rng, len(texts_list), id_digits)
  docs = render.render_docs(tok, ids, texts_list)
  lengths = np.asarray([d.size for d in docs])
  tokens = np.zeros((len(docs), int(lengths.max())), np.int32)
  for j, d in enumerate(docs):
    tokens[j, :d.size] = d
  enc = encode_documents(model, tokens, lengths)
  bank = MemoryBank.from_encoded(BankSpec.for_model(model.cfg), enc, doc_ids=np.asarray(ids))
  gold, offset = [], 0
  for ex in examples:
    gold.append([ids[offset + g] for g in ex.gold])
    offset += len(ex.docs)
  return bank, dict(zip(ids, texts_list)), gold, int(lengths.sum())


def evaluate_task(model: MSAForCausalLM, tok: Tokenizer, task: str, *, num_examples: int,
                  docs_per_example: int, doc_chars: int, group: int, seed: int = 0,
                  split: Split = Split.TEST, id_digits=(1, 6), max_rounds: int = 3,
                  content: ContentPath = ContentPath.DEVICE,
                  naming: interleave.Naming = interleave.Naming.MODEL,
                  router_docs: int = 2) -> TaskResult:
  acc, exact, rec, ret, ndocs, toks = [], [], [], [], [], []
  for g in range(-(-num_examples // group)):
    idx = range(g * group, min(num_examples, (g + 1) * group))
    examples = [synthetic.example(task, seed=seed, split=split, index=i,
                                  num_docs=docs_per_example, doc_chars=doc_chars,
                                  id_digits=id_digits) for i in idx]
    rng = np.random.default_rng([seed, int(split), 11, g])
    bank, texts, gold, n_tokens = build_memory(model, tok, examples, rng, id_digits)
    toks.append(n_tokens)
    runner = BankRunner(model, bank, content=content)
    start = model.cfg.msa.top_k_docs + (bank.template.tokens.size if bank.template else 0)
    traces = interleave.run(interleave.runner_fn(runner), tok, [ex.question for ex in examples],
                            texts, start_position=start, max_rounds=max_rounds, naming=naming,
                            router_docs=router_docs)
    for ex, gd, tr in zip(examples, gold, traces):
      acc.append(string_match_all(tr.answer, ex.answers))
      exact.append(exact_match(tr.answer, ex.answer_text))
      first = tr.rounds[0].selected if tr.rounds else {}
      rec.append(np.mean([np.mean([x in sel for x in gd]) for sel in first.values()]) if first
                 else 0.0)
      ret.append(np.mean([x in tr.retrieved for x in gd]))
      ndocs.append(len(tr.retrieved))
  return TaskResult(task=task, n=len(acc), accuracy=float(np.mean(acc)),
                    exact=float(np.mean(exact)), recall=float(np.mean(rec)),
                    retrieved_recall=float(np.mean(ret)), docs=float(np.mean(ndocs)),
                    memory_docs=group * docs_per_example, memory_tokens=float(np.mean(toks)))


def gold_ranks(doc_scores: Mapping[int, np.ndarray], aux_labels: np.ndarray) -> np.ndarray:
  """[B] rank (0 = first) of each row's best-placed gold document under its best router layer.

  doc_scores: router layer -> [B, M] document scores; aux_labels [B, M]: 1 gold, -1 left out (an
  earlier round's document, which the engine never names again), 0 other. A rank counts the
  other documents that score strictly higher, so ties favour gold.
  """
  aux = np.asarray(aux_labels)
  best = None
  for scores in doc_scores.values():
    s = np.where(aux < 0, -np.inf, np.asarray(scores, np.float64))
    gold = np.where(aux > 0, s, -np.inf).max(axis=1)
    rank = (s > gold[:, None]).sum(axis=1)
    best = rank if best is None else np.minimum(best, rank)
  return best


def route_ranks(model: MSAForCausalLM, tok: Tokenizer, spec: batches.BatchSpec,
                num_batches: int) -> np.ndarray:
  """Gold ranks of every route row of batches 0..num_batches-1 of `spec` (exact routing).

  With `spec.first_route_round` and `answer_fraction=0` this measures one retrieval round of the
  multi-hop tasks: the router's ranking of the next hop's document given the earlier ones pasted.
  """
  graphdef, state = nnx.split(model)
  routing_of = jax.jit(lambda st, b: memory_forward(graphdef, st, b)[1])
  out = []
  for i in range(num_batches):
    batch, _ = batches.build(tok, spec, i)
    routed = routing_of(state, batch)
    # Column 0 of doc_scores is the "no document" slot; memory documents are 1..M.
    out.append(gold_ranks({l: np.asarray(r.doc_scores)[:, 1:] for l, r in routed.items()},
                          batch.aux_labels))
  return np.concatenate(out)
