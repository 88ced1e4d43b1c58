"""A plain Qwen3 checkpoint written by transformers' PyTorch `Qwen3ForCausalLM`, both ways.

Import: our dense path (every token role -1) gives transformers' logits. Export with
`model_type="qwen3"`: transformers loads the very same tensors and gives bit-identical logits.
`interop.transformers.to_transformers` (that export, loaded) is the very same PyTorch model.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from msa_jax import forward
from msa_jax.config import ConfigError, MSAConfig
from msa_jax.interop import hf
from msa_jax.interop import transformers as tr
from msa_jax.nn.model import from_params

B, T, V = 2, 12, 96


def _qwen3_config(tie: bool):
  return transformers.Qwen3Config(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
      rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tie)


def _randomise(model, seed: int) -> None:
  """Random weights everywhere, norms included (their default 1 would hide a missing scale)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif "embed_tokens" in name:
        p.copy_(0.2 * noise)
      else:
        p.copy_(0.1 * noise)


def _torch_logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions))
  return out.logits.numpy()


def _our_logits(cfg, params, ids, mask, positions) -> np.ndarray:
  batch = forward.Batch.from_arrays(dict(
      input_ids=ids, doc_ids=np.full_like(ids, -1), attention_mask=mask, position_ids=positions))
  return np.asarray(forward.run(from_params(cfg, params), batch, with_losses=False).logits)


def _inputs(padded: bool):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, (B, T)).astype(np.int64)
  mask = np.ones((B, T), np.int64)
  if padded:
    mask[1, T - 5:] = 0  # right padding on row 1
    ids[1, T - 5:] = 0
  positions = np.broadcast_to(np.arange(T), (B, T)).astype(np.int64).copy()
  return ids, mask, positions


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_checkpoint(request, tmp_path_factory):
  """(transformers model in eval mode, its save_pretrained directory)."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM._from_config(
      _qwen3_config(request.param), attn_implementation="eager", dtype=torch.float32)
  _randomise(model, seed=1 + request.param)
  model.eval()
  path = tmp_path_factory.mktemp("qwen3")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.fixture(scope="module")
def imported(hf_checkpoint):
  return hf.load_checkpoint(hf_checkpoint[1])


def test_transformers_config_keys_are_understood(hf_checkpoint, imported):
  """transformers 5 writes rope_parameters, layer_types, dtype, ...; all of them are read."""
  written = json.loads((hf_checkpoint[1] / "config.json").read_text())
  cfg, _ = imported
  assert written["model_type"] == "qwen3"
  assert cfg.rope_theta == 10000.0 and cfg.head_dim == 8 and cfg.num_kv_heads == 2
  assert cfg.tie_word_embeddings == hf_checkpoint[0].config.tie_word_embeddings
  assert cfg.msa == MSAConfig()


def test_import_is_dense(imported):
  cfg, params = imported
  assert cfg.msa.router_layers == ()
  attn = params["layers"][0]["attn"]
  assert "router_q_proj" not in attn and "router_k_proj" not in attn
  assert ("lm_head" in params) == (not cfg.tie_word_embeddings)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "right_padded"])
def test_logits_match_transformers(hf_checkpoint, imported, padded):
  model, _ = hf_checkpoint
  ids, mask, positions = _inputs(padded)
  want = _torch_logits(model, ids, mask, positions)
  got = _our_logits(*imported, ids, mask, positions)
  valid = mask.astype(bool)
  assert np.abs(want).max() > 1.0  # not a trivially small comparison
  np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5)


def test_export_loads_in_transformers_bit_identically(hf_checkpoint, imported, tmp_path):
  model, _ = hf_checkpoint
  cfg, params = imported
  hf.save_checkpoint(tmp_path, cfg, params, model_type="qwen3")
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model_type"] == "qwen3" and "msa_config" not in written

  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert reloaded.dtype == torch.float32
  assert reloaded.config.tie_word_embeddings == cfg.tie_word_embeddings
  want_sd, got_sd = model.state_dict(), reloaded.state_dict()
  assert set(got_sd) == set(want_sd)
  for k in want_sd:
    assert torch.equal(got_sd[k], want_sd[k]), k

  ids, mask, positions = _inputs(padded=True)
  np.testing.assert_array_equal(_torch_logits(reloaded, ids, mask, positions),
                                _torch_logits(model, ids, mask, positions))

  # ... and our own import of the export is the same model.
  cfg2, params2 = hf.load_checkpoint(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_to_transformers_is_the_same_model(hf_checkpoint, imported):
  model, _ = hf_checkpoint
  converted = tr.to_transformers(from_params(*imported))
  assert not converted.training and converted.dtype == torch.float32
  want_sd, got_sd = model.state_dict(), converted.state_dict()
  assert set(got_sd) == set(want_sd)
  for k in want_sd:
    assert torch.equal(got_sd[k], want_sd[k]), k


def test_to_transformers_and_dense_drop_router_layers(hf_checkpoint):
  """A model with router layers becomes the Qwen3 model it was made from, on both sides."""
  model, path = hf_checkpoint
  routed = from_params(*hf.load_checkpoint(path, msa=MSAConfig(router_layers=(1,))))
  got_sd = tr.to_transformers(routed).state_dict()
  assert set(got_sd) == set(model.state_dict())
  for k, v in model.state_dict().items():
    assert torch.equal(got_sd[k], v), k
  dense = tr.dense(routed)
  assert dense.cfg.msa.router_layers == ()
  assert "router_q_proj" not in nnx.to_pure_dict(nnx.state(dense))["layers"][1]["attn"]
  ids, mask, positions = _inputs(padded=False)
  got = _our_logits(dense.cfg, nnx.to_pure_dict(nnx.state(dense)), ids, mask, positions)
  np.testing.assert_allclose(got, _torch_logits(model, ids, mask, positions), rtol=0, atol=1e-5)


def test_qwen3_export_refuses_router_layers(imported, tmp_path):
  cfg, params = imported
  routed = cfg.replace(msa=MSAConfig(router_layers=(1,)))
  with pytest.raises(hf.CheckpointError, match=r"model_type='qwen3' cannot hold router layers"):
    hf.save_checkpoint(tmp_path, routed, params, model_type="qwen3")
  assert not any(tmp_path.iterdir())


def _edit_config(src, dst, **changes):
  d = json.loads((src / "config.json").read_text())
  d.update(changes)
  dst.mkdir()
  (dst / "config.json").write_text(json.dumps(d))
  return d


@pytest.mark.parametrize("changes, match", [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
     r"unknown rope_parameters keys \['factor'\]"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}},
     r"rope_parameters.rope_type='linear' is not supported"),
    ({"rope_parameters": {"rope_type": "default"}}, r"rope_parameters lacks rope_theta"),
    ({"rope_theta": 500.0}, r"rope_theta=500.0 contradicts rope_parameters.rope_theta=10000.0"),
])
def test_rope_parameters_are_checked(hf_checkpoint, tmp_path, changes, match):
  _edit_config(hf_checkpoint[1], tmp_path / "c", **changes)
  with pytest.raises(ConfigError, match=match):
    hf.read_config(tmp_path / "c")


def test_rope_theta_is_read_from_rope_parameters(hf_checkpoint, tmp_path):
  _edit_config(hf_checkpoint[1], tmp_path / "c",
               rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
  assert hf.read_config(tmp_path / "c").rope_theta == 1234.0
