"""Top-k block gather of selected documents' chunks: kernel, reference and tile config."""

from pallas_kernels.block_gather.kernel import (BlockGatherConfig, block_gather,
                                                block_gather_reference, gather_mask)
