"""The demo recipe's second run: demo.py's routing model fine-tuned to copy answers from the
document its router names (finetune_copy.py's first four phases, 3,800 steps).

Commands (CPU, from the repository root; each resumable — rerun after a kill):
  python experiments/train.py --config=experiments/configs/demo.py --workdir=out/demo
  python experiments/train.py --config=experiments/configs/finetune_demo.py --workdir=out/finetune_demo

Expected (measured, BUILD_NOTES.md "routing's max reductions"; this 2-core CPU): ~38 min alone
(49.5 min with another training run sharing the cores), so ~72 min with demo.py's 34. Held-out
SPAN / LOOKUP copy accuracy 1.00 / 0.99 and teacher-forced exact answers 0.88 at the end; through
the engine (the unit test's 72 questions, router's best document appended) single-needle accuracy
0.97 (1.00 / 1.00 / 0.92) with the best document gold for all 72. out/finetune_demo/model is what
ships as msa_jax/assets/demo_model.
"""

from ml_collections import ConfigDict

from experiments.configs import finetune_copy


def get_config() -> ConfigDict:
  c = finetune_copy.get_config()
  # Copy-only steps (which erode routing), memory batches alternating with copy batches (which
  # bring it back within ~100 steps), LOOKUP-heavy copy steps, alternating again. finetune_copy.py's
  # fifth phase (distractor documents) did not teach key matching among pasted needles and is
  # left out. With a routing stage that matches keys (demo.py's smoothed max) no routing phase
  # after these is needed; the same-task routing phases of earlier versions repaired routers
  # that had not formed key matching (BUILD_NOTES.md).
  c.phases = c.phases[:4]
  return c
