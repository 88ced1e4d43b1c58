"""Memory Parallel (SPEC §9): the bank sharded by whole documents over a `memory` device mesh.

- `mesh`: the memory mesh (Auto axes, devices grouped by process) and sharding helpers.
- `placement`: the document-balanced shard plan of a bank.
- `routing`: `ShardedRoutingIndex` (a drop-in `RoutingIndex`: local top-k per shard, global
  top-k over the gathered candidates) and the sharded content sources.
- `encode`: stage 1 data-parallel over the mesh, and per-process banks for multi-host encoding.
"""

from msa_jax.parallel.mesh import (MEMORY, local_mesh, make_memory_mesh, replicate,
                                  replicate_model)
from msa_jax.parallel.placement import ShardPlan, balanced_split, partition_documents, plan_shards
from msa_jax.parallel.routing import (ShardedDeviceContent, ShardedHostContent,
                                      ShardedRoutingIndex)
from msa_jax.parallel.encode import (encode_documents_sharded, encode_to_process_bank,
                                     open_process_banks, process_documents)
