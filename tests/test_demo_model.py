"""The shipped demo model: it loads, and its router finds held-out needles at its training memory size.

The answer-accuracy bar (>= 0.9 on single-needle NIAH) is not met yet: the shipped model learned
routing but not copying ids and values (BUILD_NOTES.md, "Training"). The strict xfail below turns
into a failure the moment a retrained model passes, so the marker cannot outlive the fact.
"""

import numpy as np
import pytest

from msa_jax import demo
from msa_jax.train import evaluate

SINGLE = ("niah_single_1", "niah_single_2", "niah_single_3")


@pytest.fixture(scope="module")
def shipped():
  return demo.load()


@pytest.fixture(scope="module")
def single_needle(shipped):
  model, tok, data = shipped
  return [evaluate.evaluate_task(model, tok, task, num_examples=data.examples_per_memory,
                                 docs_per_example=data.docs_per_example, doc_chars=data.doc_chars,
                                 group=data.examples_per_memory, seed=1, id_digits=data.id_digits,
                                 max_rounds=1) for task in SINGLE]


def test_the_demo_checkpoint_loads_with_its_training_layout(shipped):
  model, tok, data = shipped
  assert model.cfg.vocab_size == tok.vocab_size
  assert model.cfg.msa.router_layers and data.memory_docs == 36
  size = sum(p.stat().st_size for p in demo.path().iterdir())
  assert size <= 20 * 2**20


def test_single_needle_recall_at_the_training_memory_size(single_needle):
  recall = np.mean([r.recall for r in single_needle])
  assert recall >= 0.95, [r.as_dict() for r in single_needle]


@pytest.mark.xfail(strict=True, reason="the shipped model routes but does not yet copy ids/answers")
def test_single_needle_accuracy_at_the_training_memory_size(single_needle):
  accuracy = np.mean([r.accuracy for r in single_needle])
  assert accuracy >= 0.9, [r.as_dict() for r in single_needle]
