"""The official HF checkpoint layout (SPEC §11): import∘export is the identity, bad input is loud."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from msa_jax.config import ConfigError, MSAConfig
from msa_jax.interop import hf

CKPTS = ["ckpt", "ckpt_nodecouple"]
ROUTER = "model.layers.2.self_attn.router_q_proj.0.weight"


def _config(path) -> dict:
  return json.loads((path / "config.json").read_text())


def _write(path, config: dict, tensors: dict[str, np.ndarray]):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  return path


def _assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert sorted(a) == sorted(b)
  for k in a:
    assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
    assert a[k].tobytes() == b[k].tobytes(), k


def _files(path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def official_tensors(official_dir):
  return {name: load_file(official_dir / name / "model.safetensors") for name in CKPTS}


@pytest.fixture(scope="module")
def official_configs(official_dir):
  return {name: _config(official_dir / name) for name in CKPTS}


@pytest.fixture(scope="module")
def plain_qwen3(tmp_path_factory, official_tensors, official_configs):
  """The main tiny checkpoint as a plain Qwen3 one: no msa_config, no router tensors."""
  config = {k: v for k, v in official_configs["ckpt"].items() if k != "msa_config"}
  config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
  tensors = {k: v for k, v in official_tensors["ckpt"].items()
             if ".router_" not in k and k != "temperature"}
  return _write(tmp_path_factory.mktemp("plain") / "ckpt", config, tensors), tensors


# --- import∘export is the identity ---------------------------------------------------------------


@pytest.mark.parametrize("name", CKPTS)
def test_official_roundtrip_is_byte_exact(official_dir, official_tensors, tmp_path, name):
  cfg, params = hf.load_checkpoint(official_dir / name)
  hf.save_checkpoint(tmp_path, cfg, params)
  _assert_same_tensors(load_file(tmp_path / "model.safetensors"), official_tensors[name])
  assert hf.read_config(tmp_path) == cfg
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  probe = tmp_path.parent / f"{tmp_path.name}-probe"
  probe.write_text("")  # the export has ordinary (umask) permissions, not a temp file's 0600
  assert (tmp_path / "model.safetensors").stat().st_mode == probe.stat().st_mode
  cfg2, params2 = hf.load_checkpoint(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_exported_config_keeps_every_msa_setting(official_dir, official_configs, tmp_path):
  cfg, params = hf.load_checkpoint(official_dir / "ckpt")
  hf.save_checkpoint(tmp_path, cfg, params)
  assert _config(tmp_path)["msa_config"] == official_configs["ckpt"]["msa_config"]


def test_bf16_roundtrip_is_byte_exact(official_tensors, official_configs, tmp_path):
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in official_tensors["ckpt"].items()}
  src = _write(tmp_path / "src", official_configs["ckpt"], tensors)
  cfg, params = hf.load_checkpoint(src)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  hf.save_checkpoint(tmp_path / "out", cfg, params)
  _assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), tensors)
  assert _config(tmp_path / "out")["torch_dtype"] == "bfloat16"


def test_tied_embeddings_have_no_lm_head(official_tensors, official_configs, tmp_path):
  config = dict(official_configs["ckpt"], tie_word_embeddings=True)
  tensors = {k: v for k, v in official_tensors["ckpt"].items() if k != "lm_head.weight"}
  cfg, params = hf.load_checkpoint(_write(tmp_path / "src", config, tensors))
  assert cfg.tie_word_embeddings and "lm_head" not in params
  hf.save_checkpoint(tmp_path / "out", cfg, params)
  _assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), tensors)


def test_tied_checkpoint_with_lm_head_is_an_error(official_tensors, official_configs, tmp_path):
  config = dict(official_configs["ckpt"], tie_word_embeddings=True)
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensors \['lm_head.weight'\]"):
    hf.load_checkpoint(_write(tmp_path, config, official_tensors["ckpt"]))


# --- a plain Qwen3 checkpoint --------------------------------------------------------------------


def test_plain_qwen3_loads_dense(plain_qwen3):
  cfg, params = hf.load_checkpoint(plain_qwen3[0])
  assert cfg.msa == MSAConfig()
  assert all("router_q_proj" not in layer["attn"] for layer in params["layers"].values())


def test_plain_qwen3_with_router_layers_initialises_the_router(plain_qwen3, official_tensors):
  path, tensors = plain_qwen3
  msa = MSAConfig(router_layers=(2, 3), top_k_docs=2, pooling_size=4, aux_temperature=0.25)
  cfg, params = hf.load_checkpoint(path, msa=msa)
  assert cfg.msa == msa
  for layer in (2, 3):
    attn = params["layers"][layer]["attn"]
    assert attn["router_q_proj"]["kernel"].shape == (64, 4 * 16)
    assert attn["router_k_proj"]["kernel"].shape == (64, 2 * 16)
    kernel = np.asarray(attn["router_q_proj"]["kernel"])
    assert np.all(np.isfinite(kernel)) and 0.005 < kernel.std() < 0.05
  kernel = np.asarray(params["layers"][2]["attn"]["router_q_proj"]["kernel"])
  assert "router_q_proj" not in params["layers"][1]["attn"]
  assert float(params["temperature"]) == pytest.approx(0.25)
  # The backbone is the file's; the router is new (and differs from the official one).
  np.testing.assert_array_equal(params["layers"][2]["attn"]["q_proj"]["kernel"],
                                tensors["model.layers.2.self_attn.q_proj.weight"].T)
  assert not np.allclose(kernel, official_tensors["ckpt"][ROUTER].T)
  # The seed picks the initialisation.
  _, again = hf.load_checkpoint(path, msa=msa)
  _, other = hf.load_checkpoint(path, msa=msa, seed=1)
  np.testing.assert_array_equal(again["layers"][2]["attn"]["router_q_proj"]["kernel"], kernel)
  assert not np.allclose(other["layers"][2]["attn"]["router_q_proj"]["kernel"], kernel)


def test_plain_bf16_router_is_initialised_in_bf16(plain_qwen3, tmp_path):
  path, tensors = plain_qwen3
  src = _write(tmp_path, _config(path), {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
  _, params = hf.load_checkpoint(src, msa=MSAConfig(router_layers=(3,)))
  assert params["layers"][3]["attn"]["router_k_proj"]["kernel"].dtype == ml_dtypes.bfloat16


def test_msa_checkpoint_must_have_its_router_tensors(official_tensors, official_configs, tmp_path):
  tensors = {k: v for k, v in official_tensors["ckpt"].items() if k != ROUTER}
  with pytest.raises(hf.CheckpointError, match=r"missing tensors \[.*router_q_proj"):
    hf.load_checkpoint(_write(tmp_path, official_configs["ckpt"], tensors))


# --- bad input -----------------------------------------------------------------------------------


def _drop(key):
  return lambda c, t: (c, {k: v for k, v in t.items() if k != key})


def _add(key, value):
  return lambda c, t: (c, {**t, key: value})


def _reshape(key):
  return lambda c, t: (c, {**t, key: np.zeros((t[key].shape[0] + 1, t[key].shape[1]), np.float32)})


def _cfg(**changes):
  return lambda c, t: ({**c, **changes}, t)


def _msa(**changes):
  return lambda c, t: ({**c, "msa_config": {**c["msa_config"], **changes}}, t)


BAD = {
    "missing_tensor": (_drop("model.layers.1.mlp.up_proj.weight"), hf.CheckpointError,
                       r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    "missing_temperature": (_drop("temperature"), hf.CheckpointError,
                            r"missing tensors \['temperature'\]"),
    "wrong_shape": (_reshape("model.layers.0.self_attn.k_proj.weight"), hf.CheckpointError,
                    r"model.layers.0.self_attn.k_proj.weight has shape \(33, 64\), "
                    r"expected \(32, 64\)"),
    "extra_tensor": (_add("model.layers.0.self_attn.q_proj.bias", np.zeros(64, np.float32)),
                     hf.CheckpointError, r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"),
    "router_tensor_in_plain_layer": (
        _add("model.layers.0.self_attn.router_q_proj.0.weight", np.zeros((64, 64), np.float32)),
        hf.CheckpointError, r"unexpected tensors \['model.layers.0.self_attn.router_q_proj"),
    "float64_tensor": (lambda c, t: (c, {**t, "model.norm.weight": t["model.norm.weight"].astype(
        np.float64)}), hf.CheckpointError, r"unsupported tensor dtypes \{'model.norm.weight': 'float64'\}"),
    "unknown_msa_key": (_msa(bogus_knob=1), ConfigError, r"unknown msa_config keys \['bogus_knob'\]"),
    "unknown_top_level_key": (_cfg(rope_wobble=3), ConfigError,
                              r"unknown config.json keys \['rope_wobble'\]"),
    "router_layer_out_of_range": (_msa(router_layer_idx="2,4"), ConfigError,
                                  r"router layers \[4\] outside 0..3"),
    "heads_not_divisible": (_cfg(num_attention_heads=3), ConfigError,
                            r"num_heads=3 is not a multiple of num_kv_heads=2"),
    "qwen3_with_msa_config": (_cfg(model_type="qwen3"), ConfigError,
                              r"model_type 'qwen3' with an msa_config is contradictory"),
    "msa_without_msa_config": (lambda c, t: ({k: v for k, v in c.items() if k != "msa_config"}, t),
                               ConfigError, r"model_type 'msa' requires an msa_config"),
    "unknown_model_type": (_cfg(model_type="llama"), ConfigError, r"model_type='llama'"),
    "bad_enum": (_msa(head_reduce_method="median"), ConfigError,
                 r"head_reduce_method='median': expected one of \['mean', 'max'\]"),
    "sliding_window_on": (_cfg(use_sliding_window=True), ConfigError,
                          r"use_sliding_window=True is not supported"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_checkpoint_is_a_clear_error(official_tensors, official_configs, tmp_path, name):
  edit, error, match = BAD[name]
  config, tensors = edit(official_configs["ckpt"], official_tensors["ckpt"])
  with pytest.raises(error, match=match):
    hf.load_checkpoint(_write(tmp_path, config, tensors))


def test_config_errors_name_the_file(official_configs, official_tensors, tmp_path):
  config = {**official_configs["ckpt"], "num_attention_heads": 3}
  with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: num_heads=3"):
    hf.load_checkpoint(_write(tmp_path, config, official_tensors["ckpt"]))


def test_msa_argument_with_an_msa_config_is_contradictory(official_dir):
  with pytest.raises(ConfigError, match=r"already carries msa_config; do not pass msa="):
    hf.load_checkpoint(official_dir / "ckpt", msa=MSAConfig(router_layers=(3,)))


def test_missing_config_json(official_dir, tmp_path):
  shutil.copy(official_dir / "ckpt" / "model.safetensors", tmp_path)
  with pytest.raises(hf.CheckpointError, match=r"config.json does not exist"):
    hf.load_checkpoint(tmp_path)


@pytest.mark.parametrize("text, match", [
    ('{"model_type": "msa",', r"config.json is not valid JSON"),
    ("[1, 2]", r"config.json must hold a JSON object, got list"),
])
def test_invalid_config_json(official_dir, tmp_path, text, match):
  shutil.copy(official_dir / "ckpt" / "model.safetensors", tmp_path)
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(hf.CheckpointError, match=match):
    hf.load_checkpoint(tmp_path)


def test_missing_safetensors(official_dir, tmp_path):
  shutil.copy(official_dir / "ckpt" / "config.json", tmp_path)
  with pytest.raises(hf.CheckpointError, match=r"no \*.safetensors file in"):
    hf.load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "bad_header", "empty"])
def test_corrupted_safetensors(official_dir, tmp_path, damage):
  shutil.copy(official_dir / "ckpt" / "config.json", tmp_path)
  data = (official_dir / "ckpt" / "model.safetensors").read_bytes()
  data = {"truncated": data[: len(data) // 2],
          "bad_header": data[:8] + b"\x00garbage" + data[16:],
          "empty": b""}[damage]
  (tmp_path / "model.safetensors").write_bytes(data)
  with pytest.raises(hf.CheckpointError, match=r"cannot read .*model.safetensors"):
    hf.load_checkpoint(tmp_path)


def test_tensor_in_two_shards(official_dir, official_tensors, tmp_path):
  shutil.copy(official_dir / "ckpt" / "config.json", tmp_path)
  tensors = official_tensors["ckpt"]
  save_file(tensors, tmp_path / "model-00001-of-00002.safetensors")
  save_file({"model.norm.weight": tensors["model.norm.weight"]},
            tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(hf.CheckpointError, match=r"\['model.norm.weight'\] appear in more than one"):
    hf.load_checkpoint(tmp_path)


def test_sharded_checkpoint_loads(official_dir, official_tensors, official_model, tmp_path):
  shutil.copy(official_dir / "ckpt" / "config.json", tmp_path)
  keys = sorted(official_tensors["ckpt"])
  for i, part in enumerate((keys[::2], keys[1::2])):
    save_file({k: official_tensors["ckpt"][k] for k in part},
              tmp_path / f"model-0000{i + 1}-of-00002.safetensors")
  cfg, params = hf.load_checkpoint(tmp_path)
  assert cfg == official_model[0]
  jax.tree.map(np.testing.assert_array_equal, params, official_model[1])


# --- export --------------------------------------------------------------------------------------


def test_export_replaces_a_previous_checkpoint(official_dir, official_model_nodecouple,
                                               official_tensors, tmp_path):
  shutil.copytree(official_dir / "ckpt", tmp_path, dirs_exist_ok=True)
  hf.save_checkpoint(tmp_path, *official_model_nodecouple)
  _assert_same_tensors(load_file(tmp_path / "model.safetensors"),
                       official_tensors["ckpt_nodecouple"])
  assert hf.read_config(tmp_path) == official_model_nodecouple[0]


def test_export_refuses_a_directory_with_other_shards(official_model, tmp_path):
  (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
  with pytest.raises(hf.CheckpointError, match=r"holds other safetensors files "
                                               r"\['model-00001-of-00002.safetensors'\]"):
    hf.save_checkpoint(tmp_path, *official_model)
  assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00002.safetensors"]


def test_export_with_params_that_do_not_match_the_config(official_model_nodecouple, tmp_path):
  cfg, params = official_model_nodecouple  # no router projections in params
  decoupled = cfg.replace(msa=dataclasses.replace(cfg.msa, decouple_router=True))
  with pytest.raises(hf.CheckpointError, match=r"params lack layers/2/attn/router_q_proj/kernel"):
    hf.save_checkpoint(tmp_path / "out", decoupled, params)
  assert not (tmp_path / "out").exists()


def _fail_weights(filename, tensors, metadata=None):
  with open(filename, "wb") as f:
    f.write(b"partial")
  raise OSError("disk full (simulated)")


_write_text = pathlib.Path.write_text


def _fail_config(self, *args, **kwargs):
  if self.name.endswith(".tmp"):
    _write_text(self, "{partial")
    raise OSError("disk full (simulated)")
  return _write_text(self, *args, **kwargs)


@pytest.mark.parametrize("fail", ["weights", "config"])
def test_failed_export_leaves_the_previous_checkpoint_intact(
    official_dir, official_model_nodecouple, tmp_path, monkeypatch, fail):
  shutil.copytree(official_dir / "ckpt", tmp_path, dirs_exist_ok=True)
  before = _files(tmp_path)
  if fail == "weights":
    monkeypatch.setattr(hf, "_write_safetensors", _fail_weights)
  else:
    monkeypatch.setattr(pathlib.Path, "write_text", _fail_config)
  with pytest.raises(OSError, match="disk full"):
    hf.save_checkpoint(tmp_path, *official_model_nodecouple)
  assert _files(tmp_path) == before  # same names (no temp files left) and same bytes
