"""demo.py's routing stage with same-task memory batches from step 0 (a candidate fix for the
routing stage's instability).

Command (CPU, resumable):
  python experiments/train.py --config=experiments/configs/demo_same_task.py --workdir=out/demo_same_task

Why: in mixed-task batches the router can lower its loss by scoring "a document that holds a
needle of this question's format" without matching the key; one run of demo.py stalled there and
collapsed onto a hub document (BUILD_NOTES.md, "a third run of the recipe"). With one task in every
row the other rows' needles share the gold one's format, so only key matching separates them.
Expected (measured, BUILD_NOTES.md "routing with same-task batches from step 0"; 31 min on CPU):
a negative result — the held-out aux loss stays at ln 12 (the router scores "holds a needle", not
the key; top1 0.08) from step 100 to 1,600, and the export's router is query-independent.
"""

from ml_collections import ConfigDict

from experiments.configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.phases = [{**dict(p), "same_task": True} for p in c.phases]
  return c
