"""Properties of the jitted training-path forward: static shapes, padding invariance."""

import dataclasses

import jax
import numpy as np

from conftest import load_npz
from msa_jax import forward as fw
from msa_jax.nn.model import from_params
from flax import nnx

INPUTS = ("input_ids", "doc_ids", "attention_mask", "position_ids")


def _inputs(name):
  ref = load_npz(name)
  return {k: ref[k] for k in INPUTS}


def test_one_compile_serves_batches_with_different_data(official_model):
  cfg, params = official_model
  graphdef, state = nnx.split(from_params(cfg, params))
  a = _inputs("fixture.npz")
  b = dict(a, input_ids=np.random.default_rng(0).integers(1, 320, a["input_ids"].shape))
  b["doc_ids"] = a["doc_ids"].copy()
  shapes = fw.BatchShapes.of(fw.Batch.from_arrays(a), cfg.msa.pooling_size)
  # A fresh function, so the compile cache holds only this test's entries.
  f = jax.jit(lambda g, s, b, sh: fw.forward(g, s, b, sh), static_argnums=(0, 3))
  out_a = f(graphdef, state, fw.Batch.from_arrays(a), shapes)
  out_b = f(graphdef, state, fw.Batch.from_arrays(b), shapes)
  assert f._cache_size() == 1
  assert not np.allclose(out_a.logits, out_b.logits)


def test_extra_chunk_slots_change_nothing(official_model):
  cfg, params = official_model
  graphdef, state = nnx.split(from_params(cfg, params))
  batch = fw.Batch.from_arrays(_inputs("fixture.npz"))
  tight = fw.BatchShapes.of(batch, cfg.msa.pooling_size, chunk_multiple=1)
  loose = dataclasses.replace(tight, max_chunks=tight.max_chunks + 13)
  a = fw.forward_jit(graphdef, state, batch, tight)
  b = fw.forward_jit(graphdef, state, batch, loose)
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
  for l in a.selected:
    np.testing.assert_array_equal(a.selected[l], b.selected[l])


def test_padding_side_does_not_change_valid_outputs(official_model):
  """Left-padding a batch (shifting every row right) leaves logits on valid tokens unchanged."""
  cfg, params = official_model
  model = from_params(cfg, params)
  a = _inputs("fixture.npz")
  pad = 3
  b = {k: np.pad(v, [(0, 0), (pad, 0)]) for k, v in a.items()}
  out_a = fw.run(model, fw.Batch.from_arrays(a))
  out_b = fw.run(model, fw.Batch.from_arrays(b))
  valid = a["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out_b.logits)[:, pad:][valid],
                             np.asarray(out_a.logits)[valid], atol=2e-5)
  for l in out_a.selected:
    np.testing.assert_array_equal(out_a.selected[l], out_b.selected[l])
