"""Reading the official config.json: every msa_config key is mapped; unknown or contradictory ones fail."""

import json

import pytest

from conftest import OFFICIAL
from msa_jax import config as C


def official_dict(name="ckpt"):
  return json.loads((OFFICIAL / name / "config.json").read_text())


def test_official_msa_config_maps_every_key():
  cfg = C.from_hf_dict(official_dict())
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (320, 64, 128)
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 2, 16)
  assert cfg.groups == 2 and not cfg.tie_word_embeddings
  m = cfg.msa
  assert m.top_k_docs == 2 and m.pooling_size == 4 and m.router_layers == (2, 3)
  assert m.decouple_router and m.routing_score is C.RoutingScore.COSINE
  assert (m.head_reduce, m.query_reduce, m.chunk_reduce) == (
      C.HeadReduce.MEAN, C.QueryReduce.MAX, C.ChunkReduce.MAX)
  assert (m.lm_weight, m.aux_weight, m.reconstruction_weight, m.answer_weight) == (1, 0.1, 0, 1)
  assert m.aux_temperature == 0.1
  assert cfg.aux_loss_layers == (2, 3)


def test_non_decoupled_infonce_scores_are_scaled_cosines():
  cfg = C.from_hf_dict(official_dict("ckpt_nodecouple"))
  assert not cfg.msa.decouple_router
  assert cfg.msa.routing_score is C.RoutingScore.SCALED_COSINE
  assert cfg.msa.routing_score.scale(16) == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["ckpt", "ckpt_nodecouple"])
def test_export_then_import_is_the_same_config(name):
  cfg = C.from_hf_dict(official_dict(name))
  assert C.from_hf_dict(C.to_hf_dict(cfg)) == cfg


def test_router_layer_all_means_every_layer():
  d = official_dict()
  d["msa_config"]["router_layer_idx"] = "all"
  assert C.from_hf_dict(d).msa.router_layers == (0, 1, 2, 3)


def test_plain_qwen3_is_dense_unless_msa_settings_are_given():
  d = official_dict()
  del d["msa_config"]
  d["model_type"] = "qwen3"
  assert C.from_hf_dict(d).msa.router_layers == ()
  assert C.from_hf_dict(d, msa=C.MSAConfig(router_layers=(3,))).msa.router_layers == (3,)


def test_fingerprint_changes_with_anything_that_changes_outputs():
  cfg = C.from_hf_dict(official_dict())
  assert cfg.fingerprint() == C.from_hf_dict(official_dict()).fingerprint()
  other = cfg.replace(msa=C.MSAConfig(top_k_docs=3, pooling_size=4, router_layers=(2, 3)))
  assert other.fingerprint() != cfg.fingerprint()


def _with(path, value):
  d = official_dict()
  target = d
  for p in path[:-1]:
    target = target[p]
  target[path[-1]] = value
  return d


@pytest.mark.parametrize("path,value,message", [
    (("msa_config", "pooling_kernal_size"), 4, "unknown msa_config keys .*pooling_kernal_size"),
    (("msa_config", "head_reduce_method"), "median", "head_reduce_method='median'"),
    (("msa_config", "query_reduce_method"), "first", "query_reduce_method='first'"),
    (("msa_config", "chunk_reduce_method"), "sum", "chunk_reduce_method='sum'"),
    (("msa_config", "router_layer_idx"), "2,9", r"router layers \[9\] outside 0..3"),
    (("msa_config", "router_layer_idx"), "2,x", "router_layer_idx='2,x'"),
    (("msa_config", "router_layer_idx"), "2,2", "repeats a layer"),
    (("msa_config", "top_k_docs"), 0, "top_k_docs must be >= 1"),
    (("msa_config", "pooling_kernel_size"), 0, "pooling_size must be >= 1"),
    (("msa_config", "aux_loss_method"), "MSE", "aux_loss_method='MSE'"),
    (("msa_config", "aux_loss"), False, "aux_loss=false"),
    (("msa_config", "rewrite_position"), False, "rewrite_position=false"),
    (("msa_config", "decouple_pooling_mode"), "max", "decouple_pooling_mode"),
    (("num_key_value_heads",), 3, "not a multiple of num_key_value_heads|not a multiple of num_kv_heads"),
    (("model_type",), "llama", "model_type='llama'"),
    (("model_type",), "qwen3", "'qwen3' with an msa_config is contradictory"),
    (("hidden_act",), "gelu", "hidden_act='gelu'"),
    (("rope_scaling",), {"type": "yarn"}, "rope_scaling"),
    (("some_new_key",), 1, "unknown config.json keys"),
    (("layer_types",), ["full_attention", "sliding_attention"] * 2, "layer_types"),
])
def test_bad_configs_fail_with_a_message_naming_the_problem(path, value, message):
  with pytest.raises(C.ConfigError, match=message):
    C.from_hf_dict(_with(path, value))


def test_missing_required_keys_are_named():
  d = official_dict()
  del d["num_attention_heads"]
  with pytest.raises(C.ConfigError, match="num_attention_heads"):
    C.from_hf_dict(d)


def test_msa_settings_passed_twice_are_contradictory():
  with pytest.raises(C.ConfigError, match="already carries msa_config"):
    C.from_hf_dict(official_dict(), msa=C.MSAConfig())


def test_default_routing_score_follows_the_router_kind():
  assert C.MSAConfig().routing_score is C.RoutingScore.COSINE
  assert C.MSAConfig(decouple_router=False).routing_score is C.RoutingScore.SCALED_COSINE
