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

from ml_collections import ConfigDict

NIAH_MIX = ("niah_single_1:2,niah_single_2:2,niah_single_3:2,niah_multikey_1:1,"
            "niah_multikey_2:1,niah_multikey_3:1,niah_multivalue:0.25,niah_multiquery:0.25")


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.init_seed = 0
  c.model = ConfigDict(dict(
      vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
      num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
      max_position_embeddings=32768))
  c.msa = ConfigDict(dict(top_k_docs=8, pooling_size=16, router_layers=(2, 3),
                          aux_temperature=0.1))
  # Answer rows get up to 2 distractor documents injected beside the gold ones.
  c.data = ConfigDict(dict(tasks=NIAH_MIX, rows=12, doc_chars=160, seed=0, answer_fraction=0.6,
                           id_digits=(1, 6), distractors=2))
  # Router warm-up (0.1·LM + aux, as in the paper), then the main phase; the memory grows from
  # 24 to 36 documents per batch (a curriculum over memory size). The copying signals are on
  # from the start: an LM loss on every document's closing [id] (the id the model must read from
  # pooled memory to name a document), labels on the injected restated question (a copy of the
  # question) and the answer loss (SPEC §7) on top of the LM loss.
  copying = dict(doc_weight=1.0, label_restated=True, answer_weight=1.0)
  c.phases = [
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, warmup=30),
      dict(steps=900, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2, **copying),
      dict(steps=300, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3,
           decay_to=0.1, **copying),
  ]
  c.train = ConfigDict(dict(clip_norm=1.0, weight_decay=0.01, accumulate=1, bf16=False,
                            log_every=10, eval_every=100, eval_batches=2, checkpoint_every=50,
                            keep_checkpoints=2))
  return c
