"""demo.py's routing model fine-tuned to copy answers from the documents its router names: the
previous shipped model's fine-tune (five phases; the demo recipe, finetune_demo.py, runs the first
four).

Commands (CPU, from the repository root; each resumable — rerun after a kill):
  python experiments/train.py --config=experiments/configs/demo.py --workdir=out/demo
  python experiments/train.py --config=experiments/configs/finetune_copy.py --workdir=out/finetune

Expected (measured, BUILD_NOTES.md "the copy fine-tune that ships"; ~95 min here after demo.py's
84, with the exact-max routing stage of that time): held-out copy accuracy 1.00 (SPAN) / 1.00
(LOOKUP); through the engine at 36 documents, router recall@8 1.00 and, with the router's best
document appended, single-needle accuracy 0.90-1.00.
"""

from ml_collections import ConfigDict

from experiments.configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.init_from = "out/demo/model"  # demo.py's export (relative to the repository root)
  # SPAN rows are the ones that form the copy mechanism (in the copy-only runs it appeared after
  # ~500-700 of them), so the copy stream is mostly SPAN; LOOKUP rows and answer rows teach the
  # answer format. One span unit per row, the layout of the probe in which copying first formed
  # (here it still took ~1,900 steps, so the layout is not what sets the plateau; BUILD_NOTES.md).
  c.copy = ConfigDict(dict(span_rows=32, span_length=128, span_units=1, lookup_rows=8,
                           lookup_fraction=0.1))
  # Copy-only steps until copying forms (one-unit SPAN rows: held-out SPAN accuracy 0.13-0.25
  # for ~1,300 steps, then the jump), then every second step a memory batch of the demo's last
  # phase (36 documents, closing-id loss, restated question) with the answer loss weighted, so
  # that routing, which copy-only steps erode, comes back while copying settles.
  c.phases = [
      dict(steps=2100, lr=1e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=3, warmup=30,
           copy_every=1),
      dict(steps=800, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, copy_every=2,
           doc_weight=1.0, label_restated=True, answer_weight=1.0, decay_to=0.1),
      # SPAN rows teach copying within ~100 tokens; answering copies the key and value from
      # 300-800 tokens back, which LOOKUP rows teach: a LOOKUP-heavy copy-only stretch, then
      # memory batches again to restore routing.
      dict(steps=500, lr=1e-3, lm_weight=1.0, aux_weight=0.0, docs_per_example=3, warmup=20,
           copy_every=1, lookup_fraction=0.75),
      dict(steps=400, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, copy_every=2,
           doc_weight=1.0, label_restated=True, answer_weight=1.0, decay_to=0.1,
           lookup_fraction=0.5),
      # Named documents at inference come from different examples, each with a needle of its
      # own key: answer rows with up to 3 other documents of the memory pasted beside the gold
      # one, so the value is copied from the needle whose key matches the question (measured: this
  # key matching did not form in 600 steps; BUILD_NOTES.md).
      dict(steps=600, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, warmup=20,
           copy_every=3, doc_weight=1.0, label_restated=True, answer_weight=1.0, decay_to=0.1,
           lookup_fraction=0.5, distractors=3, answer_fraction=0.75),
  ]
  c.train.eval_every = 100
  return c
