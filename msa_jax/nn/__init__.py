"""Thin Flax NNX modules: they own parameters and call `msa_jax.math`."""

from msa_jax.nn.layers import MLP, Buffer, Embed, Linear, RMSNorm
from msa_jax.nn.model import Attention, Block, MSAForCausalLM, Routing, Sequence, from_params
