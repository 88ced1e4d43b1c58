"""Memory Interleave's end of retrieval and answers: 600 steps from the second-hop routing stage
(multihop_route.py) with 40 % of memory batches answer rows (`<End-of-Retrieve>`, the restated
question and the answer after every round's documents), the rest route rows.

Commands (CPU, from the repository root; each resumable — rerun after a kill): multihop_copy.py,
multihop_router.py, multihop_route.py (see their docstrings), then
  python experiments/train.py --config=experiments/configs/multihop_answer.py --workdir=out/multihop_answer
  python experiments/train.py --config=experiments/configs/multihop_bridge.py --workdir=out/multihop_bridge
  python experiments/train.py --config=experiments/configs/multihop_final.py --workdir=out/multihop_final

Expected (measured, BUILD_NOTES.md "second-hop routing forms in 1,500 route steps"; 10 min here):
at the training memory size (36 documents, router names one document a round, the model ends
retrieval) bridge / chain-2 / chain-3 0.46 / 0.96 / 0.58, with 2.3 / 2.3 / 2.8 documents.
"""

from ml_collections import ConfigDict

from experiments.configs import multihop_route


def get_config() -> ConfigDict:
  c = multihop_route.stage_config("out/multihop_route/model")  # the previous stage's export
  c.phases = [multihop_route.route_phase(multihop_route.HOP_ROUTE_MIX, steps=600, lr=3e-4, warmup=20,
                                         decay_to=0.1, answer_fraction=0.4)]
  return c
