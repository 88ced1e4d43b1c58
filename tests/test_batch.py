"""SPEC §13 batches: validation errors name the problem; static sizes are derived on the host."""

import numpy as np
import pytest

from conftest import load_npz
from msa_jax.forward import Batch, BatchError, BatchShapes

REQUIRED = ("input_ids", "doc_ids", "attention_mask", "position_ids")


def row(doc_ids):
  doc_ids = np.asarray([doc_ids])
  return {"input_ids": np.ones_like(doc_ids), "doc_ids": doc_ids,
          "attention_mask": np.ones_like(doc_ids), "position_ids": np.zeros_like(doc_ids)}


def test_official_fixture_batch_is_accepted_with_its_aliases():
  b = Batch.from_arrays(load_npz("fixture.npz"))
  assert b.aux_labels.shape == (2, 6) and b.answer_labels.shape == (2, 63)
  assert b.train_qa_samples.tolist() == [1, 0]


@pytest.mark.parametrize("doc_ids,message", [
    ([-2, 2, 2, 0], r"runs \[2\]"),  # does not start at 1
    ([1, 1, 3, 3, 0], r"runs \[1, 3\]"),  # skips an id
    ([2, 2, 1, 1, 0], r"runs \[2, 1\]"),  # decreasing
    ([1, 1, 2, 1, 0], r"runs \[1, 2, 1\]"),  # a document split in two
    ([1, 1, 0, 1, 0], "document 1 is not contiguous"),  # split by an active token
    ([1, -3, 0], r"doc_ids \[-3\] are not roles"),
])
def test_non_contiguous_document_ids_are_rejected(doc_ids, message):
  with pytest.raises(BatchError, match=message):
    Batch.from_arrays(row(doc_ids))


def test_padding_is_ignored_when_checking_documents():
  a = row([1, 1, 7, 2, 0])
  a["attention_mask"][0, 2] = 0
  Batch.from_arrays(a)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("position_ids"), r"lacks required arrays \['position_ids'\]"),
    (lambda a: a.update(doc_ids=a["doc_ids"][:, :-1]), "doc_ids has shape"),
    (lambda a: a.update(input_ids=a["input_ids"].astype(np.float32)), "input_ids must be an integer"),
    (lambda a: a.update(input_ids=a["input_ids"][0]), r"must be \[B, T\]"),
    (lambda a: a.update(aux_labels=np.zeros((3, 2), np.int64)), "aux_labels must be"),
    (lambda a: a.update(answer_labels=a["input_ids"]), "come together"),
])
def test_malformed_arrays_are_rejected(change, message):
  a = row([-2, 1, 1, 2, 0])
  change(a)
  with pytest.raises(BatchError, match=message):
    Batch.from_arrays(a)


@pytest.mark.parametrize("lengths,pooling,chunks", [
    ([1], 4, 1), ([3, 4, 5], 4, 4), ([9], 4, 3), ([4, 4], 4, 2), ([], 4, 0)])
def test_shapes_count_chunks_per_document(lengths, pooling, chunks):
  doc_ids = [-2] + [d + 1 for d, n in enumerate(lengths) for _ in range(n)] + [0, 0, -1]
  shapes = BatchShapes.of(Batch.from_arrays(row(doc_ids)), pooling, chunk_multiple=1)
  assert shapes.max_chunks == max(chunks, 1)
  assert shapes.num_doc_slots == len(lengths) + 1


def test_shapes_round_chunk_slots_up_for_compile_reuse():
  b = Batch.from_arrays(row([1] * 9 + [0]))
  assert BatchShapes.of(b, 4).max_chunks == 8
  assert BatchShapes.of(b, 1).max_chunks == 16
