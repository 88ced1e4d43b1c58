"""Bridge-heavy multi-hop stage: 1,300 steps from multihop_answer.py's export with bridge questions
the most frequent task (their second hop is the one still missed most), smoothed routing, then
answer rows as the learning rate decays. multihop_final.py continues from its export.

Commands (CPU, from the repository root; each resumable — rerun after a kill): multihop_copy.py,
multihop_router.py, multihop_route.py, multihop_answer.py (see their docstrings), then
  python experiments/train.py --config=experiments/configs/multihop_bridge.py --workdir=out/multihop_bridge
  python experiments/train.py --config=experiments/configs/multihop_final.py --workdir=out/multihop_final

Expected (measured, BUILD_NOTES.md "second-hop routing forms in 1,500 route steps"; 17 min here):
at the training memory size bridge / chain-2 / chain-3 0.75 / 1.00 / 1.00 with 2.0 / 2.0 / 3.0
documents; MSA interleave 0.73 [0.60, 0.85] at 16K tokens and 0.62 [0.48, 0.75] at 64K.
"""

from ml_collections import ConfigDict

from experiments.configs import multihop_route

BRIDGE_MIX = "bridge:4,chain_2:1,chain_3:2,niah_single_1:1,niah_single_2:1,niah_single_3:1"


def get_config() -> ConfigDict:
  c = multihop_route.stage_config("out/multihop_answer/model")  # the previous stage's export
  c.phases = [multihop_route.route_phase(BRIDGE_MIX, steps=1000, lr=5e-4, warmup=20, decay_to=1.0,
                                         answer_fraction=0.2, route_softness=0.1),
              multihop_route.route_phase(BRIDGE_MIX, steps=300, lr=3e-4, decay_to=0.1,
                                         answer_fraction=0.4)]
  return c
