"""Second-hop routing for Memory Interleave: 1,500 route-heavy steps on the multi-hop tasks from
the router-only warm-up (multihop_router.py), with the earlier rounds' documents left out of each
row's contrast.

Commands (CPU, from the repository root; each resumable — rerun after a kill):
  python experiments/train.py --config=experiments/configs/multihop_copy.py --workdir=out/multihop_ft
  python experiments/train.py --config=experiments/configs/multihop_router.py --workdir=out/multihop_router
  python experiments/train.py --config=experiments/configs/multihop_route.py --workdir=out/multihop_route
then multihop_answer.py and multihop_bridge.py (the shipped multi-hop model).

Expected (measured, BUILD_NOTES.md "second-hop routing forms in 1,500 route steps"; 20 min here):
held-out same-task route batches top1 0.15 → 0.54 at step 800 → 0.88 at 1,500; end to end MSA
interleave 0.71 [0.50, 0.88] (hop recall 0.79 / 0.75 / 0.75), oracle 0.92.
"""

from ml_collections import ConfigDict

from experiments.configs import multihop_copy

# The router-only warm-up's mix, and this stage's: more multi-hop batches than NIAH ones, whose
# routing is formed and only kept.
ROUTER_MIX = "bridge:2,chain_2:1,chain_3:1,niah_single_1:1,niah_single_2:1,niah_single_3:1"
HOP_ROUTE_MIX = "bridge:3,chain_2:2,chain_3:2,niah_single_1:1,niah_single_2:1,niah_single_3:1"


def stage_config(init_from: str) -> ConfigDict:
  """multihop_copy.py's data and copy stream, starting from `init_from`; phases set by the caller."""
  c = multihop_copy.get_config()
  c.init_from = init_from
  c.train.eval_every = 100
  c.train.keep_checkpoints = 20
  return c


def route_phase(tasks: str, **fields) -> dict:
  """A phase of the route stages: same-task memory batches of `tasks` (3 documents per example),
  LM + aux, and a multi-hop LOOKUP copy batch every fourth step so that answering is kept."""
  return dict(lm_weight=1.0, aux_weight=1.0, docs_per_example=3, same_task=True, tasks=tasks,
              copy_every=4, lookup_fraction=1.0, hop_fraction=0.75, label_restated=True,
              answer_weight=1.0, **fields)


def get_config() -> ConfigDict:
  c = stage_config("out/multihop_router/model")  # multihop_router.py's export
  # A second-round row's query holds the first round's document, which matches itself best under
  # the max over query tokens; with it left out of the contrast (batches.build), the row's target
  # is the best of the rest: the document that shares the bridge entity. Every row of a batch asks
  # one task (negatives of the gold one's format). Route rows only for 1,200 steps (routing is
  # what is missing); then answer rows join as the learning rate decays. 400 steps of this (with
  # a third of them copy batches) did not form second-hop routing: it forms between steps 500 and
  # 1,000 (BUILD_NOTES.md).
  c.phases = [route_phase(HOP_ROUTE_MIX, steps=1200, lr=1e-3, warmup=20, decay_to=1.0,
                          answer_fraction=0.0, route_softness=0.2),
              route_phase(HOP_ROUTE_MIX, steps=300, lr=5e-4, decay_to=0.1, answer_fraction=0.25)]
  return c
