"""The training-path forward matches the official PyTorch MSA code on its own outputs.

Fixtures: tests/data/official_msa_tiny (see its README). Tolerances from the issue: logits 1e-5
abs on valid tokens, document scores 1e-6, identical selections, losses 1e-5 relative.
"""

import numpy as np
import pytest

from conftest import load_npz
from msa_jax import forward as fw
from msa_jax.nn.model import from_params

LOGITS_ATOL = 1e-5
SCORES_ATOL = 1e-6
LOSS_RTOL = 1e-5
LOSSES = ("loss", "lm_loss", "aux_loss", "answer_loss", "reconstruction_loss")

CASES = {
    "fixture.npz": "official_model",  # decoupled router, template, doc lengths multiple of P
    "fixture_partial_nodecouple.npz": "official_model_nodecouple",  # partial chunks
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  cfg, params = request.getfixturevalue(CASES[request.param])
  ref = load_npz(request.param)
  model = from_params(cfg, params)
  return cfg, model, ref, fw.run(model, fw.Batch.from_arrays(ref))


def test_logits_match_on_valid_tokens(case):
  _, _, ref, out = case
  valid = ref["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref["logits"][valid], atol=LOGITS_ATOL,
                             rtol=0)


def test_document_scores_match_including_absent_documents(case):
  cfg, _, ref, out = case
  assert sorted(out.doc_scores) == list(cfg.msa.router_layers)
  for l, ours in out.doc_scores.items():
    ours, theirs = np.asarray(ours), ref[f"doc_scores_L{l}"]
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], atol=SCORES_ATOL, rtol=0)


def test_selected_documents_are_identical(case):
  _, _, ref, out = case
  for l, ours in out.selected.items():
    np.testing.assert_array_equal(np.asarray(ours), ref[f"selected_docs_L{l}"], err_msg=f"layer {l}")


def test_losses_match(case):
  _, _, ref, out = case
  for name in LOSSES:
    np.testing.assert_allclose(float(getattr(out.losses, name)), float(ref[name]), rtol=LOSS_RTOL,
                               atol=1e-7, err_msg=name)


def test_aux_loss_does_not_need_lm_labels(case):
  """The official no-label run reports the same aux loss: it depends on aux labels only."""
  _, model, ref, _ = case
  arrays = {k: ref[k] for k in ("input_ids", "doc_ids", "attention_mask", "position_ids",
                                "batch_aux_labels")}
  out = fw.run(model, fw.Batch.from_arrays(arrays))
  np.testing.assert_allclose(float(out.losses.aux_loss), float(ref["aux_loss_nolabels"]),
                             rtol=LOSS_RTOL)
  assert float(out.losses.lm_loss) == 0.0
