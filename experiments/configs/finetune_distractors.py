"""finetune_copy.py plus a fifth phase of distractor documents: the fine-tune as first run, whose
step-4,400 export was the shipped model before the recipe was cut to phases 1-4.

Command (CPU, from the repository root, in finetune_copy.py's workdir: it resumes from that run's
step-3,800 checkpoint and adds 600 steps, ~30 min here):
  python experiments/train.py --config=experiments/configs/finetune_distractors.py --workdir=out/finetune

Expected (measured, BUILD_NOTES.md "Training"): the key matching it was meant to teach did not
form (teacher-forced exact answers on distractor batches 0.42-0.62); single-needle accuracy
through the engine 0.958 on the 144 questions of eval_niah.py, level with step 3,800 (0.930)
within the noise. The NIAH scaling study up to 100M tokens was measured with this export.
"""

from ml_collections import ConfigDict

from experiments.configs import finetune_copy


def get_config() -> ConfigDict:
  c = finetune_copy.get_config()
  # Named documents at inference come from different examples, each with a needle of its own key:
  # answer rows with up to 3 other documents of the memory pasted beside the gold one, so that the
  # value is copied from the needle whose key matches the question.
  c.phases.append(
      dict(steps=600, lr=1e-3, lm_weight=1.0, aux_weight=0.5, docs_per_example=3, warmup=20,
           copy_every=3, doc_weight=1.0, label_restated=True, answer_weight=1.0, decay_to=0.1,
           lookup_fraction=0.5, distractors=3, answer_fraction=0.75))
  return c
