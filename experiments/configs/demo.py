"""The shipped demo model: a 4-layer, d=128 MSA model trained from scratch on synthetic NIAH.

Command (CPU, about 90 minutes on 2 cores; resumable — rerun the same command after a kill):
  python experiments/train.py --config=experiments/configs/demo.py --workdir=out/demo

Expected (measured, BUILD_NOTES.md "Training"): at the training memory size (36 documents) the
router finds the needle document (recall@8 = 1.0 on seven of the eight NIAH variants), but the
model has not learned to copy ids or values (answer accuracy 0); the acceptance bar of answer
accuracy >= 0.9 is not met. The run writes out/demo/metrics.jsonl, TensorBoard events in
out/demo/tb and the exported HF checkpoint in out/demo/model (what ships as
msa_jax/assets/demo_model).
"""

from ml_collections import ConfigDict

NIAH_MIX = ("niah_single_1:2,niah_single_2:2,niah_single_3:2,niah_multikey_1:1,"
            "niah_multikey_2:1,niah_multikey_3:1,niah_multivalue:0.25,niah_multiquery:0.25")
# Multi-hop rows (about one in seven) so that the model re-routes on appended text and answers
# after two retrieval rounds (Memory Interleave); the copy stage does not depend on this mix.
MULTIHOP_MIX = "bridge:0.75,chain_2:0.75"


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.init_seed = 0
  c.model = ConfigDict(dict(
      vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
      num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
      max_position_embeddings=32768))
  c.msa = ConfigDict(dict(top_k_docs=8, pooling_size=16, router_layers=(2, 3),
                          aux_temperature=0.1))
  # Answer rows get up to 2 distractor documents pasted beside the gold ones (as at inference,
  # where the router's best documents include non-gold ones).
  c.data = ConfigDict(dict(tasks=f"{NIAH_MIX},{MULTIHOP_MIX}", rows=12, doc_chars=160, seed=0,
                           answer_fraction=0.6, id_digits=(1, 6), distractors=2))
  # Dense copy batches (msa_jax/data/copying.py): half span-repeat rows, half NIAH answer steps
  # with short pasted documents. A from-scratch model forms its match-and-copy mechanism on these
  # within ~1k steps; in MSA batches alone it does not within the CPU budget.
  c.copy = ConfigDict(dict(span_rows=32, span_length=128, lookup_rows=8, lookup_fraction=0.5))
  copying = dict(doc_weight=1.0, label_restated=True, answer_weight=1.0)
  # 1. a copy stage; 2. router warm-up (0.1·LM + aux, as in the paper); 3. the main phase with
  # the copying losses; 4. a larger memory (24 -> 36 documents per batch) with the learning
  # rate decaying. Every third step of 2-4 is a copy batch, so copying is not forgotten.
  c.phases = [
      dict(steps=1400, lr=1.5e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=2, warmup=50,
           copy_every=1),
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, copy_every=3),
      dict(steps=600, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2, copy_every=3,
           **copying),
      dict(steps=300, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, copy_every=3,
           decay_to=0.1, **copying),
      # 5. routing: the router's recall@8 at 36 documents was 0.67 after phase 4 (copying was
      # already right), so a final phase weights the aux loss up.
      dict(steps=250, lr=1e-3, lm_weight=0.5, aux_weight=1.0, docs_per_example=3, copy_every=3,
           warmup=20, decay_to=0.1, **copying),
  ]
  c.train = ConfigDict(dict(clip_norm=1.0, weight_decay=0.01, accumulate=1, bf16=False,
                            log_every=10, eval_every=100, eval_batches=2, checkpoint_every=50,
                            keep_checkpoints=2))
  return c
