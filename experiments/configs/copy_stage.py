"""The demo model with a dense copy stage first (msa_jax/data/copying.py): it copies, but routes less.

Command (CPU, about 2 hours on 2 cores; resumable — rerun the same command after a kill):
  python experiments/train.py --config=experiments/configs/copy_stage.py --workdir=out/copy_stage

Same model, memory layout and held-out tasks as demo.py. Phases: 1,400 copy-only steps, then the
MSA phases with every third step a copy batch, and multi-hop rows (about one in seven) in the mix.

Expected (measured, BUILD_NOTES.md "Training"): copying is learned (held-out teacher-forced copy
accuracy 0.99; answer loss 0.06 nat/token vs ~1.0 without the copy stage; with the example's gold
document pasted, single-needle answer accuracy 1.0), but router recall@8 at 36 documents is 0.67
(the shipped demo.py model: 1.00), so end to end, with the router naming 3 documents, single-needle
accuracy is 0.08. This config does not produce the shipped model; its routing needs more memory
steps than the CPU budget leaves after the copy stage.
"""

from ml_collections import ConfigDict

from experiments.configs import demo

# Multi-hop rows (about one in seven) so that the model re-routes on appended text and answers
# after two retrieval rounds (Memory Interleave); the copy stage does not depend on this mix.
MULTIHOP_MIX = "bridge:0.75,chain_2:0.75"


def get_config() -> ConfigDict:
  c = demo.get_config()
  # Answer rows get up to 2 distractor documents pasted beside the gold ones (as at inference,
  # where the router's best documents include non-gold ones).
  c.data.update(tasks=f"{demo.NIAH_MIX},{MULTIHOP_MIX}", answer_fraction=0.6, distractors=2)
  c.copy = ConfigDict(dict(span_rows=32, span_length=128, lookup_rows=8, lookup_fraction=0.5))
  copying = dict(doc_weight=1.0, label_restated=True, answer_weight=1.0)
  # 1. a copy stage; 2. router warm-up (0.1·LM + aux, as in the paper); 3. the main phase with
  # the copying losses; 4. a larger memory (24 -> 36 documents per batch) with the learning
  # rate decaying; 5. routing. Every third step of 2-5 is a copy batch, so copying is not forgotten.
  c.phases = [
      dict(steps=1400, lr=1.5e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=2, warmup=50,
           copy_every=1),
      dict(steps=100, lr=1.5e-3, lm_weight=0.1, aux_weight=1.0, docs_per_example=2, copy_every=3),
      dict(steps=600, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=2, copy_every=3,
           **copying),
      dict(steps=300, lr=1.5e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, copy_every=3,
           decay_to=0.1, **copying),
      # Added after phase 4 had left router recall@8 at 0.67 (it stayed there).
      dict(steps=250, lr=1e-3, lm_weight=0.5, aux_weight=1.0, docs_per_example=3, copy_every=3,
           warmup=20, decay_to=0.1, **copying),
  ]
  return c
