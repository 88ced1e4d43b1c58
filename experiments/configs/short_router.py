"""Stage 1 of a shorter candidate recipe for the demo model: demo.py's first 800 steps.

Measured: the candidate fails end to end (short_copy.py, BUILD_NOTES.md).

Command (CPU, about 30-35 minutes on 2 cores; resumable — rerun the same command after a kill):
  python experiments/train.py --config=experiments/configs/short_router.py --workdir=out/router

Expected: demo.py's router warm-up and main phase at 24 documents per memory, whose held-out
router recall@8 reached 1.00 by step 800 in demo.py's run (BUILD_NOTES.md "Training"); no copying
yet. short_copy.py continues from its export. The candidate's hypothesis: the copy fine-tune's
memory phases (aux weight 0.5, closing-id loss) finish the routing that demo.py's steps 800-1,600
trained, so the two stages together reach the shipped model's accuracy in ~1 h 45 min instead of
the ~3 h of demo.py + finetune_copy.py.
"""

from ml_collections import ConfigDict

from experiments.configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.phases = c.phases[:2]
  return c
