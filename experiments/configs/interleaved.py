"""The demo model with copy batches interleaved from step 0: routing and copying trained together.

Command (CPU, about 2 hours on 2 cores; resumable — rerun the same command after a kill):
  python experiments/train.py --config=experiments/configs/interleaved.py --workdir=out/interleaved

Same model, memory layout and NIAH mix as demo.py; every second step is a dense copy batch
(msa_jax/data/copying.py).
"""

from ml_collections import ConfigDict

from experiments.configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.copy = ConfigDict(dict(span_rows=32, span_length=128, lookup_rows=8, lookup_fraction=0.5))
  # The memory batches are the shipped run's (router warm-up, then LM + 0.5·aux over 24, then 36
  # documents) with no pasted distractors: LOOKUP copy rows already teach picking the matching
  # document among several, and pasted non-gold text in an answer row's routing query contradicts
  # its aux-loss positives. Copy batches alternate with memory batches from the first step, so
  # the copy mechanism forms while routing trains instead of before it.
  c.phases = [
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, warmup=30,
           copy_every=2),
      dict(steps=1900, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2,
           copy_every=2),
      dict(steps=900, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3,
           copy_every=2, answer_weight=1.0, label_restated=True, decay_to=0.1),
  ]
  c.train.eval_every = 200
  return c
