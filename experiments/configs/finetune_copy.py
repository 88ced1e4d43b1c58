"""The shipped demo model (demo.py) fine-tuned to copy: a short copy-only stage, then copy batches
alternating with the demo's last memory phase so that routing comes back while copying forms.

Command (CPU; run demo.py first, or start from the shipped checkpoint as below; resumable):
  python experiments/train.py --config=experiments/configs/finetune_copy.py --workdir=out/finetune
"""

from ml_collections import ConfigDict

from experiments.configs import demo
from msa_jax import demo as shipped


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.init_from = str(shipped.path())
  # SPAN rows are the ones that form the copy mechanism (in the copy-only runs it appeared after
  # ~500-700 of them), so the copy stream is mostly SPAN; LOOKUP rows and answer rows teach the
  # answer format. One span unit per row: with rows packed full, earlier spans compete with the
  # one to copy and copying did not form within 700 steps (BUILD_NOTES.md).
  c.copy = ConfigDict(dict(span_rows=32, span_length=128, span_units=1, lookup_rows=8,
                           lookup_fraction=0.1))
  # A copy-only fine-tune of this model formed copying in ~700 steps but erased routing after
  # 1,500 (BUILD_NOTES.md "Training"); so 700 copy-only steps, then every second step a memory
  # batch of the demo's last phase (36 documents, closing-id loss, restated question) with the
  # answer loss weighted, so that routing comes back while copying settles.
  c.phases = [
      dict(steps=700, lr=1e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=3, warmup=30,
           copy_every=1),
      dict(steps=600, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, copy_every=2,
           doc_weight=1.0, label_restated=True, answer_weight=1.0, decay_to=0.1),
  ]
  c.train.eval_every = 100
  return c
