"""An attempt at a demo model that copies: the demo recipe with the copying losses from step 0.

Command (CPU; resumable):
  python experiments/train.py --config=experiments/configs/demo_copying.py --workdir=out/copying

Differences from demo.py: the closing-id document loss, labels on the restated question and the
answer loss from the end of the router warm-up on; 60 % answer batches; answer rows get up to 2
distractor documents appended beside the gold ones.

Expected (measured, BUILD_NOTES.md "Training"): routing as in demo.py, but by step 700 (of 1,300;
the run was stopped there) no copying: the held-out answer loss plateaus near 1.0 nat/token and
teacher-forced predictions of the restated question and of the value are not copies, i.e. no
induction mechanism has formed. This config documents the attempt; it does not produce the
shipped model.
"""

from experiments.configs import demo


def get_config():
  c = demo.get_config()
  # Answer rows get up to 2 distractor documents appended beside the gold ones.
  c.data.update(answer_fraction=0.6, distractors=2)
  copying = dict(doc_weight=1.0, label_restated=True, answer_weight=1.0)
  c.phases = [
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, warmup=30),
      dict(steps=900, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2, **copying),
      dict(steps=300, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3,
           decay_to=0.1, **copying),
  ]
  return c
