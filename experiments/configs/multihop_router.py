"""Router-only warm-up for multi-hop routing: the multi-hop fine-tune's router projections trained
on multi-hop route rows (second-round rows included) with the backbone held.

Commands (CPU, from the repository root; each resumable — rerun after a kill):
  python experiments/train.py --config=experiments/configs/multihop_copy.py --workdir=out/multihop_ft
  python experiments/train.py --config=experiments/configs/multihop_router.py --workdir=out/multihop_router
  python experiments/train.py --config=experiments/configs/multihop_route.py --workdir=out/multihop_route

Expected (measured, BUILD_NOTES.md "second-hop routing forms in 1,500 route steps"; ~8 min here):
on held-out same-task route batches (36 documents) the gold document's median rank moves from
6-20 to 2-6, first for 0.06-0.28 of rows: the backbone's features alone do not rank it first.
"""

from ml_collections import ConfigDict

from experiments.configs import multihop_route


def get_config() -> ConfigDict:
  c = multihop_route.stage_config("out/multihop_ft/model")  # multihop_copy.py's export
  c.phases = [dict(steps=600, lr=2e-3, lm_weight=1.0, aux_weight=1.0, docs_per_example=3,
                   warmup=20, decay_to=0.1, same_task=True, answer_fraction=0.0,
                   tasks=multihop_route.ROUTER_MIX, router_only=True, route_softness=0.2,
                   label_restated=True)]
  return c
