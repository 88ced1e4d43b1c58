"""The demo model's routing stage: a 4-layer, d=128 MSA model trained from scratch on synthetic NIAH.

Commands (CPU, from the repository root; each resumable — rerun after a kill):
  python experiments/train.py --config=experiments/configs/demo.py --workdir=out/demo
  python experiments/train.py --config=experiments/configs/finetune_demo.py --workdir=out/finetune_demo

Expected (measured, BUILD_NOTES.md "routing's max reductions"; this 2-core CPU): 34 minutes.
Held-out aux loss ~0.95 at step 800 and ~0.2 at 1,600, top1 1.00; through the engine (36-document
memories) the router's best document is the gold one for ~0.96 of single-needle questions, but
this model does not copy answers yet (accuracy 0). It writes out/demo/metrics.jsonl, TensorBoard
events in out/demo/tb and the exported HF checkpoint in out/demo/model, which finetune_demo.py
starts from (the two runs make the shipped model).
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
  c.data = ConfigDict(dict(tasks=NIAH_MIX, rows=12, doc_chars=160, seed=0, answer_fraction=0.5,
                           id_digits=(1, 6)))
  # Router warm-up (0.1·LM + aux, as in the paper), then the main phase; the memory grows from
  # 24 to 36 documents per batch (a curriculum over memory size). From step 800 on, two dense
  # copying signals are added: an LM loss on every document's closing [id] (the id the model must
  # read from pooled memory to name a document) and labels on the injected restated question.
  # (The run that produced the shipped model had learned routing but not yet copying by step
  # 800; steps 0-800 are the same with or without these phases split.)
  # Routing's max reductions are smoothed (`route_softness`, a log-mean-exp) for the first 1,200
  # steps and exact for the last 400, as at inference: with the exact max from step 0 the
  # question's template words win the max for every needle document and key matching may never
  # form (BUILD_NOTES.md "routing's max reductions").
  c.phases = [
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, warmup=30,
           route_softness=0.2),
      dict(steps=700, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2,
           route_softness=0.2),
      dict(steps=400, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2,
           doc_weight=1.0, label_restated=True, route_softness=0.05),
      dict(steps=400, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3,
           doc_weight=1.0, label_restated=True, decay_to=0.1),
  ]
  c.train = ConfigDict(dict(clip_norm=1.0, weight_decay=0.01, accumulate=1, bf16=False,
                            log_every=10, eval_every=100, eval_batches=2, checkpoint_every=50,
                            keep_checkpoints=2))
  return c
