"""A seconds-long run for tests and smoke checks.

Command:
  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny

Expected: finishes in well under a minute on CPU; the loss falls; writes metrics.jsonl, tb/,
checkpoints/ and model/.
"""

from experiments.configs import demo


def get_config():
  c = demo.get_config()
  c.model.update(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
  c.msa.update(top_k_docs=2, pooling_size=8)
  c.data.update(rows=2, doc_chars=60, tasks="niah_single_1", id_digits=(1, 2))
  c.phases = [dict(steps=2, lr=3e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, warmup=1,
                   route_softness=0.2),
              dict(steps=4, lr=3e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2)]
  c.train.update(log_every=2, eval_every=3, eval_batches=1, checkpoint_every=2)
  return c
