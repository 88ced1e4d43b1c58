"""Model configuration: frozen dataclasses with enums, and the mapping to the official HF `config.json`.

The official code keeps MSA settings in a loosely typed `msa_config` dict (strings such as
`router_layer_idx="2,3"` and `head_reduce_method="mean"`). Here every key is mapped explicitly;
unknown keys and contradictory values raise `ConfigError` instead of becoming silent defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration that cannot be interpreted unambiguously."""


class HeadReduce(enum.Enum):
  MEAN = "mean"
  MAX = "max"


class QueryReduce(enum.Enum):
  MAX = "max"
  MEAN = "mean"
  LAST = "last"


class ChunkReduce(enum.Enum):
  MAX = "max"
  MEAN = "mean"


class RoutingScore(enum.Enum):
  """How a routing query and a pooled routing key are compared.

  COSINE: both L2-normalised per head, scale 1 (the paper; official decoupled INFONCE).
  SCALED_COSINE: both L2-normalised, scale 1/sqrt(H) (official non-decoupled INFONCE).
  SCALED_DOT: raw dot product times 1/sqrt(H) (official inference under INFONCE_DECOUPLE).
  """

  COSINE = "cosine"
  SCALED_COSINE = "scaled_cosine"
  SCALED_DOT = "scaled_dot"

  @property
  def normalize(self) -> bool:
    return self is not RoutingScore.SCALED_DOT

  def scale(self, head_dim: int) -> float:
    return 1.0 if self is RoutingScore.COSINE else 1.0 / math.sqrt(head_dim)


@dataclasses.dataclass(frozen=True)
class MSAConfig:
  """Memory Sparse Attention settings (SPEC §1). `router_layers=()` is a dense Qwen3 model."""

  top_k_docs: int = 16
  pooling_size: int = 64
  router_layers: tuple[int, ...] = ()
  decouple_router: bool = True
  head_reduce: HeadReduce = HeadReduce.MEAN
  query_reduce: QueryReduce = QueryReduce.MAX
  chunk_reduce: ChunkReduce = ChunkReduce.MAX
  # None: what the official training path uses for this router (cosine when decoupled, cosine
  # scaled by 1/sqrt(H) otherwise).
  routing_score: RoutingScore | None = None
  aux_temperature: float = 0.1
  lm_weight: float = 1.0
  aux_weight: float = 0.1
  reconstruction_weight: float = 0.0
  answer_weight: float = 1.0
  # Provenance of an imported checkpoint, written back unchanged on export.
  aux_loss_method: str = "INFONCE"

  def __post_init__(self):
    if self.routing_score is None:
      object.__setattr__(self, "routing_score", RoutingScore.COSINE if self.decouple_router
                         else RoutingScore.SCALED_COSINE)
    if self.top_k_docs < 1:
      raise ConfigError(f"top_k_docs must be >= 1, got {self.top_k_docs}")
    if self.pooling_size < 1:
      raise ConfigError(f"pooling_size must be >= 1, got {self.pooling_size}")
    if tuple(sorted(set(self.router_layers))) != tuple(self.router_layers):
      raise ConfigError(f"router_layers must be strictly increasing, got {self.router_layers}")
    if self.aux_temperature <= 0:
      raise ConfigError(f"aux_temperature must be > 0, got {self.aux_temperature}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen3 backbone plus MSA settings. Shape letters: V vocab, D model, F MLP, N/K heads, H head dim."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  msa: MSAConfig = MSAConfig()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
    bad = [l for l in self.msa.router_layers if not 0 <= l < self.num_layers]
    if bad:
      raise ConfigError(f"router layers {bad} outside 0..{self.num_layers - 1}")

  @property
  def groups(self) -> int:
    """G: query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  def is_router_layer(self, layer: int) -> bool:
    return layer in self.msa.router_layers

  @property
  def aux_loss_layers(self) -> tuple[int, ...]:
    """Router layers that contribute to the InfoNCE loss (index >= L/2, as in the official code)."""
    return tuple(l for l in self.msa.router_layers if l >= self.num_layers // 2)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def fingerprint(self) -> str:
    """A stable hash of everything that changes the model's outputs."""
    blob = json.dumps(to_hf_dict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- the official HF config.json -------------------------------------------------------------

# Qwen3Config fields we read, and the ModelConfig field each becomes.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_position_embeddings",
}

# The type of each of those ModelConfig fields.
_HF_TYPES = {f: int for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                              "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings")}
_HF_TYPES |= {"rms_norm_eps": float, "rope_theta": float, "tie_word_embeddings": bool}

# Keys HF writes that do not change the math here (bookkeeping, generation or training-only knobs).
_HF_IGNORED = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "max_window_layers", "bos_token_id", "eos_token_id",
    "pad_token_id", "layer_types", "sliding_window", "output_attentions", "output_hidden_states",
    "return_dict", "_name_or_path", "auto_map", "tokenizer_class", "id2label", "label2id",
})

# Keys whose value must be exactly this (anything else is a different architecture).
_HF_REQUIRED_VALUES = {
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "rope_scaling": None,
}

_MSA_KEYS = frozenset({
    "top_k_docs", "pooling_kernel_size", "router_layer_idx", "decouple_router", "aux_loss",
    "aux_loss_method", "infonce_loss_temp", "lmloss_weigth", "auxloss_weight", "recloss_weight",
    "ansloss_weight", "head_reduce_method", "query_reduce_method", "chunk_reduce_method",
    "rewrite_position", "decouple_pooling_mode",
})

_AUX_LOSS_METHODS = ("INFONCE", "INFONCE_DECOUPLE")

# transformers >= 5 writes `rope_parameters: {"rope_type": "default", "rope_theta": θ}` instead of a
# top-level rope_theta; only the default (unscaled) RoPE is this architecture.
_ROPE_PARAMETER_KEYS = frozenset({"rope_type", "rope_theta"})


def _rope_theta_from_parameters(d: Mapping[str, Any]) -> float | None:
  """rope_theta from `rope_parameters` (None when absent); checks it against a top-level rope_theta."""
  rp = d.get("rope_parameters")
  if rp is None:
    return None
  if not isinstance(rp, Mapping):
    raise ConfigError(f"config.json rope_parameters={rp!r}: expected an object")
  unknown = sorted(set(rp) - _ROPE_PARAMETER_KEYS)
  if unknown:
    raise ConfigError(f"unknown rope_parameters keys {unknown}; known keys are "
                      f"{sorted(_ROPE_PARAMETER_KEYS)}")
  if rp.get("rope_type", "default") != "default":
    raise ConfigError(f"config.json rope_parameters.rope_type={rp['rope_type']!r} is not "
                      "supported (expected 'default')")
  if "rope_theta" not in rp:
    raise ConfigError("config.json rope_parameters lacks rope_theta")
  theta = _typed("config.json rope_parameters.rope_theta", rp["rope_theta"], float)
  top = d.get("rope_theta")
  if top is not None and _typed("config.json rope_theta", top, float) != theta:
    raise ConfigError(f"config.json rope_theta={d['rope_theta']!r} contradicts "
                      f"rope_parameters.rope_theta={rp['rope_theta']!r}")
  return theta


def _typed(where: str, value: Any, kind: type) -> Any:
  """`value` of config field `where` as an int, a finite float or a bool, else ConfigError.

  Numeric strings and integral floats are accepted (the official msa_config is loosely typed);
  a bool is not a number, and a bool field takes only true / false (bool("false") is True).
  """
  if kind is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{where}={value!r}: expected true or false")
  what = "an integer" if kind is int else "a number"
  expected = ConfigError(f"{where}={value!r}: expected {what}")
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise expected
  if kind is int and isinstance(value, int):
    return value
  try:
    x = float(value)  # "4", "4.0", 4.0, "1e-6"
  except ValueError:
    raise expected from None
  if kind is int:
    if x.is_integer():  # false for inf and nan
      return int(x)
    raise expected
  if not math.isfinite(x):
    raise ConfigError(f"{where}={value!r}: expected a finite number")
  return x


def _parse_router_layers(value: Any, num_layers: int) -> tuple[int, ...]:
  if value == "all":
    return tuple(range(num_layers))
  if isinstance(value, str):
    try:
      layers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
      raise ConfigError(f"msa_config.router_layer_idx={value!r}: expected 'all' or '2,3,...'") from None
  elif isinstance(value, (list, tuple)) and all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    layers = tuple(value)
  else:
    raise ConfigError(f"msa_config.router_layer_idx={value!r}: expected 'all' or '2,3,...'")
  if len(set(layers)) != len(layers):
    raise ConfigError(f"msa_config.router_layer_idx={value!r} repeats a layer")
  return tuple(sorted(layers))


def _enum(enum_cls, key: str, value: Any):
  try:
    return enum_cls(value)
  except ValueError:
    allowed = [e.value for e in enum_cls]
    raise ConfigError(f"msa_config.{key}={value!r}: expected one of {allowed}") from None


def _routing_score(method: str, decouple: bool) -> RoutingScore:
  """The score the official *training* path uses (SPEC §12: one setting for both of our paths)."""
  if method not in _AUX_LOSS_METHODS:
    raise ConfigError(f"msa_config.aux_loss_method={method!r}: expected one of {_AUX_LOSS_METHODS}")
  return RoutingScore.COSINE if decouple else RoutingScore.SCALED_COSINE


def msa_config_from_hf(msa: Mapping[str, Any], num_layers: int) -> MSAConfig:
  if not isinstance(msa, Mapping):
    raise ConfigError(f"msa_config={msa!r}: expected an object")
  unknown = sorted(set(msa) - _MSA_KEYS)
  if unknown:
    raise ConfigError(f"unknown msa_config keys {unknown}; known keys are {sorted(_MSA_KEYS)}")
  if msa.get("aux_loss", True) is not True:
    # The official model only computes document scores when aux_loss is true; a checkpoint with
    # false has never routed with the scores we compute.
    raise ConfigError("msa_config.aux_loss=false is not supported: routing needs document scores")
  if msa.get("decouple_pooling_mode", "mean") != "mean":
    raise ConfigError(
        f"msa_config.decouple_pooling_mode={msa['decouple_pooling_mode']!r}: only 'mean' exists")
  if msa.get("rewrite_position", True) is not True:
    raise ConfigError(
        "msa_config.rewrite_position=false is not supported: msa-jax always uses the supplied "
        "position_ids (pass arange(T) to get the official rewrite_position=false behaviour)")
  defaults = MSAConfig()

  def get(key: str, kind: type, default):
    return _typed(f"msa_config.{key}", msa.get(key, default), kind)

  decouple = get("decouple_router", bool, True)
  method = msa.get("aux_loss_method", "INFONCE")
  return MSAConfig(
      top_k_docs=get("top_k_docs", int, defaults.top_k_docs),
      pooling_size=get("pooling_kernel_size", int, defaults.pooling_size),
      router_layers=_parse_router_layers(msa.get("router_layer_idx", "all"), num_layers),
      decouple_router=decouple,
      head_reduce=_enum(HeadReduce, "head_reduce_method", msa.get("head_reduce_method", "mean")),
      query_reduce=_enum(QueryReduce, "query_reduce_method", msa.get("query_reduce_method", "max")),
      chunk_reduce=_enum(ChunkReduce, "chunk_reduce_method", msa.get("chunk_reduce_method", "max")),
      routing_score=_routing_score(method, decouple),
      aux_temperature=get("infonce_loss_temp", float, defaults.aux_temperature),
      lm_weight=get("lmloss_weigth", float, defaults.lm_weight),
      aux_weight=get("auxloss_weight", float, defaults.aux_weight),
      reconstruction_weight=get("recloss_weight", float, defaults.reconstruction_weight),
      answer_weight=get("ansloss_weight", float, defaults.answer_weight),
      aux_loss_method=method,
  )


def from_hf_dict(d: Mapping[str, Any], *, msa: MSAConfig | None = None) -> ModelConfig:
  """Reads an official MSA (`model_type: "msa"`) or plain Qwen3 (`"qwen3"`) config.json dict.

  For a plain Qwen3 config, `msa` supplies the MSA settings (default: no router layers, i.e. a
  dense model); for an MSA config, passing `msa` as well is contradictory and an error.
  """
  model_type = d.get("model_type")
  if model_type not in ("msa", "qwen3"):
    raise ConfigError(f"model_type={model_type!r}: expected 'msa' or 'qwen3'")
  known = set(_HF_FIELDS) | _HF_IGNORED | set(_HF_REQUIRED_VALUES) | {"msa_config",
                                                                      "rope_parameters"}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"unknown config.json keys {unknown}")
  for key, want in _HF_REQUIRED_VALUES.items():
    if key in d and d[key] != want:
      raise ConfigError(f"config.json {key}={d[key]!r} is not supported (expected {want!r})")
  if any(t != "full_attention" for t in d.get("layer_types") or ()):
    raise ConfigError(f"config.json layer_types={d['layer_types']!r}: only full attention layers "
                      "are supported")
  rope_theta = _rope_theta_from_parameters(d)
  # A null value counts as absent (a null head_dim is derived like a missing one).
  missing = [k for k in _HF_FIELDS if d.get(k) is None
             and k not in ("head_dim", "tie_word_embeddings", "max_position_embeddings")
             and not (k == "rope_theta" and rope_theta is not None)]
  if missing:
    raise ConfigError(f"config.json lacks required keys {missing}")
  kw = {ours: _typed(f"config.json {theirs}", d[theirs], _HF_TYPES[ours])
        for theirs, ours in _HF_FIELDS.items() if d.get(theirs) is not None}
  if rope_theta is not None:
    kw["rope_theta"] = rope_theta
  kw.setdefault("head_dim", kw["hidden_size"] // max(kw["num_heads"], 1))
  kw.setdefault("tie_word_embeddings", False)
  if model_type == "msa":
    if "msa_config" not in d:
      raise ConfigError("model_type 'msa' requires an msa_config")
    if msa is not None:
      raise ConfigError("an MSA config.json already carries msa_config; do not pass msa= as well")
    msa = msa_config_from_hf(d["msa_config"], kw["num_layers"])
  else:
    if "msa_config" in d:
      raise ConfigError("model_type 'qwen3' with an msa_config is contradictory; use 'msa'")
    msa = msa or MSAConfig()
  return ModelConfig(**kw, msa=msa)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """The official MSA config.json for `cfg` (`model_type: "msa"`, loadable by the official code)."""
  m = cfg.msa
  if m.routing_score is not _routing_score(m.aux_loss_method, m.decouple_router):
    raise ConfigError(
        f"routing_score={m.routing_score.value} has no official equivalent with "
        f"decouple_router={m.decouple_router}, aux_loss_method={m.aux_loss_method!r}")
  layers = ",".join(str(l) for l in m.router_layers)
  return {
      "architectures": ["MSAForCausalLM"],
      "model_type": "msa",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": False,
      "torch_dtype": "float32",
      "msa_config": {
          "top_k_docs": m.top_k_docs,
          "pooling_kernel_size": m.pooling_size,
          "router_layer_idx": layers,
          "decouple_router": m.decouple_router,
          "aux_loss": True,
          "aux_loss_method": m.aux_loss_method,
          "infonce_loss_temp": m.aux_temperature,
          "lmloss_weigth": m.lm_weight,
          "auxloss_weight": m.aux_weight,
          "recloss_weight": m.reconstruction_weight,
          "ansloss_weight": m.answer_weight,
          "head_reduce_method": m.head_reduce.value,
          "query_reduce_method": m.query_reduce.value,
          "chunk_reduce_method": m.chunk_reduce.value,
          "rewrite_position": True,
          "decouple_pooling_mode": "mean",
      },
  }
