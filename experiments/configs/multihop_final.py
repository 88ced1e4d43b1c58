"""The shipped multi-hop model's last stage: 1,000 steps from multihop_bridge.py's export, bridge
questions six times as frequent as each other task, at a lower learning rate, then answer rows as
it decays. Exported as msa_jax/assets/multihop_model.

Commands (CPU, from the repository root; each resumable — rerun after a kill; ~96 min in all):
  python experiments/train.py --config=experiments/configs/multihop_copy.py --workdir=out/multihop_ft
  python experiments/train.py --config=experiments/configs/multihop_router.py --workdir=out/multihop_router
  python experiments/train.py --config=experiments/configs/multihop_route.py --workdir=out/multihop_route
  python experiments/train.py --config=experiments/configs/multihop_answer.py --workdir=out/multihop_answer
  python experiments/train.py --config=experiments/configs/multihop_bridge.py --workdir=out/multihop_bridge
  python experiments/train.py --config=experiments/configs/multihop_final.py --workdir=out/multihop_final
Then `python experiments/multihop.py --model=out/multihop_final/model --sizes=16K,64K --per_task=16`.

Expected (measured, BUILD_NOTES.md "second-hop routing forms in 1,500 route steps"; 16 min here):
at the training memory size bridge / chain-2 / chain-3 0.88 / 1.00 / 1.00 with 2.0 / 2.0 / 3.0
documents; MSA interleave 0.81 [0.69, 0.92] at 16K tokens and 0.69 [0.54, 0.81] at 64K.
"""

from ml_collections import ConfigDict

from experiments.configs import multihop_route

FINAL_MIX = "bridge:6,chain_2:1,chain_3:1,niah_single_1:1,niah_single_2:1,niah_single_3:1"


def get_config() -> ConfigDict:
  c = multihop_route.stage_config("out/multihop_bridge/model")  # the previous stage's export
  c.phases = [multihop_route.route_phase(FINAL_MIX, steps=800, lr=3e-4, warmup=20, decay_to=1.0,
                                         answer_fraction=0.2, route_softness=0.1),
              multihop_route.route_phase(FINAL_MIX, steps=200, lr=2e-4, decay_to=0.1,
                                         answer_fraction=0.4)]
  return c
