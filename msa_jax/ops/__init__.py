"""Memory-bank ops with an `implementation=` choice: "xla" (always works; default off GPU) or
"pallas" (the kernels in `pallas_kernels/`; default on GPU, interpreted elsewhere).

This is the only place in msa_jax that imports `pallas_kernels` (lazily, on the "pallas" path).
The "xla" paths are the formulations that are fast on XLA:CPU (performance_notes A6).
"""

from msa_jax.ops._dispatch import Implementation, default_implementation
from msa_jax.ops.gather import gather_doc_chunks
from msa_jax.ops.routing import ScanConfig, bank_chunk_scores, bank_top_k_docs
