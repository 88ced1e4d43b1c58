"""The shipped demo model: it loads, its router finds held-out needles at its training memory size,
and it answers from the documents the router names.

Evaluated end to end through the engine on held-out keys and values: the memory is encoded into a
bank, the router's best document is appended (`Naming.ROUTER`, one round) and the model writes
the answer. The model has not learned to name documents itself (`Naming.MODEL`, the id read from
pooled memory) nor to pick the needle whose key matches among several pasted ones
(BUILD_NOTES.md, "Training").
"""

import numpy as np
import pytest

from msa_jax import demo
from msa_jax.engine.interleave import Naming
from msa_jax.train import evaluate

SINGLE = ("niah_single_1", "niah_single_2", "niah_single_3")
# Two memories of 36 documents per variant, 72 questions in all: the standard error of the mean
# accuracy is ~0.03, small enough to tell a model at ~0.94 from the 0.9 bar.
QUESTIONS_PER_TASK = 24


@pytest.fixture(scope="module")
def shipped():
  return demo.load()


@pytest.fixture(scope="module")
def single_needle(shipped):
  model, tok, data = shipped
  return [evaluate.evaluate_task(model, tok, task, num_examples=QUESTIONS_PER_TASK,
                                 docs_per_example=data.docs_per_example, doc_chars=data.doc_chars,
                                 group=data.examples_per_memory, seed=1, id_digits=data.id_digits,
                                 max_rounds=1, naming=Naming.ROUTER, router_docs=1)
          for task in SINGLE]


def test_the_demo_checkpoint_loads_with_its_training_layout(shipped):
  model, tok, data = shipped
  assert model.cfg.vocab_size == tok.vocab_size
  assert model.cfg.msa.router_layers and data.memory_docs == 36
  size = sum(p.stat().st_size for p in demo.path().iterdir())
  assert size <= 20 * 2**20


def test_single_needle_recall_at_the_training_memory_size(single_needle):
  recall = np.mean([r.recall for r in single_needle])
  assert recall >= 0.95, [r.as_dict() for r in single_needle]


# Measured on these 72 questions: 0.972 (single-1/2/3 1.00 / 1.00 / 0.917); on the 144 of
# `experiments/eval_niah.py` (seed 0): 0.938 (BUILD_NOTES.md).
def test_single_needle_accuracy_at_the_training_memory_size(single_needle):
  accuracy = np.mean([r.accuracy for r in single_needle])
  assert accuracy >= 0.9, [r.as_dict() for r in single_needle]
