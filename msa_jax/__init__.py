"""msa-jax: Memory Sparse Attention in JAX/Flax.

Layers (imports point downward): `cli` → `forward` (training path) → `nn` (NNX modules that own
parameters) → `math` (pure jittable functions) → `config`. `interop` converts checkpoints.
"""

from msa_jax.config import (ChunkReduce, ConfigError, HeadReduce, ModelConfig, MSAConfig,
                            QueryReduce, RoutingScore)
from msa_jax.forward import Batch, BatchError, BatchShapes, ForwardOutput, Losses, forward_jit, run
from msa_jax.nn.model import MSAForCausalLM, from_params

__version__ = "0.1.0"
