"""The kernels lower for CUDA through Pallas' Triton backend — checked without a GPU.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' GPU lowering on this CPU
machine: every in-kernel op must have a Triton lowering rule and every in-kernel shape must be a
power of 2, or lowering raises. The result holds one `__gpu$xla.gpu.triton` custom call per
pallas_call with the serialized Triton IR. Compiling that IR to PTX and running it needs a GPU
(pallas_kernels/gpu_check.py).
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from msa_jax.config import HeadReduce, QueryReduce
from pallas_kernels.block_gather import BlockGatherConfig, block_gather
from pallas_kernels.routing_scores import RoutingScoresConfig, routing_scores

S = jax.ShapeDtypeStruct
TRITON_CALL = "@__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *shapes) -> str:
  return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


# (B, T, N, K, H, C, keys dtype, block_c): MSA-4B heads with a bank that leaves a tail tile;
# the tiny model; 3 samples (padded to 4) and 40 tokens (padded to 64)
ROUTING = [(1, 3, 32, 8, 128, 1000, jnp.bfloat16, 64), (2, 1, 2, 2, 64, 512, jnp.float32, 256),
           (3, 40, 4, 2, 64, 300, jnp.bfloat16, 128)]


# every reduction on the first shape, one on each of the others
ROUTING_CASES = ([(0, hr, qr) for hr, qr in itertools.product(HeadReduce, QueryReduce)] +
                 [(1, HeadReduce.MEAN, QueryReduce.MAX), (2, HeadReduce.MAX, QueryReduce.MEAN)])


@pytest.mark.parametrize("case,hr,qr", ROUTING_CASES,
                         ids=[f"shape{i}-{h.value}-{q.value}" for i, h, q in ROUTING_CASES])
def test_routing_scores_lowers_to_triton(case, hr, qr):
  b, t, n, k, h, c, dtype, block = ROUTING[case]
  txt = lower_for_cuda(
      lambda q, qm, keys, cv: routing_scores(q, qm, keys, cv, 1.0, head_reduce=hr,
                                             query_reduce=qr,
                                             config=RoutingScoresConfig(block_c=block)),
      S((b, t, n, h), jnp.float32), S((b, t), jnp.bool_), S((c, k, h), dtype), S((c,), jnp.bool_))
  assert txt.count(TRITON_CALL) == (1 if c % block == 0 else 2)  # full tiles + the tail tile
  assert "msa_routing_scores" in txt


@pytest.mark.parametrize("rows", [None, 4])
def test_block_gather_lowers_to_triton(rows):
  txt = lower_for_cuda(
      lambda c, o, n, s: block_gather(c, o, n, s, max_chunks=13,
                                      config=BlockGatherConfig(block_rows=rows)),
      S((1000, 8, 128), jnp.bfloat16), S((70,), jnp.int32), S((70,), jnp.int32),
      S((2, 16), jnp.int32))
  assert txt.count(TRITON_CALL) == 1 and "msa_block_gather" in txt
