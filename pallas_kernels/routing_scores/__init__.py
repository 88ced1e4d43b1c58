"""Fused routing scores over a memory bank: kernel, reference and tile config."""

from pallas_kernels.routing_scores.kernel import (RoutingScoresConfig, prepare_queries,
                                                  routing_scores, routing_scores_reference)
