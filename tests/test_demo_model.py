"""The shipped demo model routes and answers held-out single-needle NIAH (issue acceptance bar)."""

import numpy as np
import pytest

from msa_jax import demo
from msa_jax.train import evaluate

SINGLE = ("niah_single_1", "niah_single_2", "niah_single_3")


@pytest.fixture(scope="module")
def shipped():
  return demo.load()


def test_the_demo_checkpoint_loads_with_its_training_layout(shipped):
  model, tok, data = shipped
  assert model.cfg.vocab_size == tok.vocab_size
  assert model.cfg.msa.router_layers and data.memory_docs >= 24
  size = sum(p.stat().st_size for p in demo.path().iterdir())
  assert size <= 20 * 2**20


def test_single_needle_recall_and_accuracy_at_the_training_memory_size(shipped):
  model, tok, data = shipped
  results = [evaluate.evaluate_task(model, tok, task, num_examples=data.examples_per_memory,
                                    docs_per_example=data.docs_per_example,
                                    doc_chars=data.doc_chars, group=data.examples_per_memory,
                                    seed=1, id_digits=data.id_digits) for task in SINGLE]
  recall = np.mean([r.recall for r in results])
  accuracy = np.mean([r.accuracy for r in results])
  assert recall >= 0.95, [r.as_dict() for r in results]
  assert accuracy >= 0.9, [r.as_dict() for r in results]
