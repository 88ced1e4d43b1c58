"""Dynamic memory: routing over a bank changed by add / delete / replace / compact equals routing
over a bank built from scratch with the same documents (the official engine can only re-encode)."""

import jax
import numpy as np
import pytest

from msa_jax.engine import encode, prefill
from msa_jax.engine.run import BankRunner, ContentPath
from msa_jax.memory.bank import BankSpec
from msa_jax.memory.store import BankWriter, open_bank
from msa_jax.nn.model import from_params

REQUEST = ("input_ids", "doc_ids", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def model(official_model):
  return from_params(*official_model)


def docs(seed, m):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 14, m)
  tokens = np.full((m, 14), -1)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(0, 320, n)
  return tokens, lengths


def route(model, bank):
  from conftest import load_npz
  ref = load_npz("fixture_inference.npz")
  req = prefill.Request.from_arrays({k: ref["stage2_" + k] for k in REQUEST})
  out, _ = BankRunner(model, bank, content=ContentPath.CALLBACK).prefill(req, 1,
                                                                     with_doc_scores=True)
  result = {}
  for l, r in out.routed.items():
    ids = np.asarray(r.doc_ids)
    # Scores per stable document id, for the documents that are live.
    per_id = {int(i): np.asarray(r.doc_scores)[:, row] for row, i in enumerate(bank.doc_ids)
              if bank.live[row]}
    result[l] = (ids, np.asarray(r.scores), per_id, np.asarray(out.logits))
  return result


def assert_same_routing(a, b):
  for l in a:
    np.testing.assert_array_equal(a[l][0], b[l][0])
    np.testing.assert_allclose(a[l][1], b[l][1], atol=1e-6)
    assert set(a[l][2]) == set(b[l][2])
    for i in a[l][2]:
      np.testing.assert_allclose(a[l][2][i], b[l][2][i], atol=1e-6)
    np.testing.assert_allclose(a[l][3], b[l][3], atol=1e-5)


def test_add_delete_replace_compact_route_like_a_fresh_bank(model, tmp_path):
  spec = BankSpec.for_model(model.cfg)
  tok_a, len_a = docs(0, 8)
  tok_b, len_b = docs(1, 3)
  tok_r, len_r = docs(2, 1)
  with BankWriter(tmp_path / "dyn", spec) as w:
    w.append(encode.encode_documents(model, tok_a, len_a))  # ids 0..7
    w.delete([2, 5])
    w.append(encode.encode_documents(model, tok_b, len_b))  # ids 8..10
    w.replace(encode.encode_documents(model, tok_r, len_r), [4])  # id 4 moves to the end
  dynamic = open_bank(tmp_path / "dyn")
  assert dynamic.doc_ids[dynamic.live].tolist() == [0, 1, 3, 6, 7, 8, 9, 10, 4]

  # The same live documents, in the same order and with the same ids, encoded in one go.
  keep = [0, 1, 3, 6, 7]
  tokens = np.concatenate([tok_a[keep], tok_b, tok_r])
  lengths = np.concatenate([len_a[keep], len_b, len_r])
  with BankWriter(tmp_path / "fresh", spec) as w:
    w.append(encode.encode_documents(model, tokens, lengths), doc_ids=[0, 1, 3, 6, 7, 8, 9, 10, 4])
  fresh = open_bank(tmp_path / "fresh")
  expected = route(model, fresh)
  assert_same_routing(route(model, dynamic), expected)
  for r in expected.values():  # the deleted documents are never chosen
    assert not np.isin(r[0], [2, 5]).any()

  with BankWriter(tmp_path / "dyn") as w:
    assert w.compact() == 3  # two deleted rows and the replaced one
  compacted = open_bank(tmp_path / "dyn")
  assert compacted.live.all() and compacted.num_docs == 9
  assert_same_routing(route(model, compacted), expected)
