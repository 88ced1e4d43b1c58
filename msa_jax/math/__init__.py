"""Pure, jittable MSA math on arrays: no modules, no parameters, callable from a notebook."""

from msa_jax.math import attention, losses, masks, norms, pooling, roles, rope, routing
from msa_jax.math.attention import attend
from msa_jax.math.losses import infonce_loss, lm_loss, shifted_cross_entropy
from msa_jax.math.masks import memory_mask, token_mask
from msa_jax.math.norms import l2_normalize, rms_norm
from msa_jax.math.pooling import PackedChunks, chunk_mean, num_chunks, segment_chunk_mean
from msa_jax.math.rope import apply_rope
from msa_jax.math.routing import (chunk_scores, doc_scores, reduce_heads, reduce_queries, route,
                                  select_top_k, selected_chunk_mask, token_chunk_scores)
