"""Synthetic data: tokenizers, RULER-style NIAH and multi-hop tasks as memory documents."""

from msa_jax.data import multihop, niah, text, tokenizer
from msa_jax.data.niah import Example, Variant
from msa_jax.data.multihop import HopTask
from msa_jax.data.text import Split, split_of
from msa_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Special, Tokenizer, load_tokenizer
