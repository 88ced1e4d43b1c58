"""Training curves of a run: loss terms, router recall, teacher-forced exact match (and copy accuracy).

Train curves are of memory batches only; a run with copy batches gets a fourth panel with the
held-out copy accuracies.

  python experiments/plot_training.py --workdir=out/demo --output=docs/demo_training.png
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "PNG to write.", required=True)


def main(argv):
  del argv
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(l) for l in open(os.path.join(_WORKDIR.value, "metrics.jsonl"))]
  # A resumed run re-logs the steps after its last checkpoint: keep the latest row of each step.
  train = list({r["step"]: r for r in rows
                if r["split"] == "train" and r.get("batch", "memory") == "memory"}.values())
  test = list({r["step"]: r for r in rows if r["split"] == "test"}.values())
  copy = [r for r in test if "copy_span_accuracy" in r]
  fig, axes = plt.subplots(1, 4 if copy else 3, figsize=(17 if copy else 13, 3.6))
  for name in ("lm_loss", "aux_loss"):
    axes[0].plot([r["step"] for r in train], [r[name] for r in train], label=f"train {name}")
    axes[0].plot([r["step"] for r in test], [r[name] for r in test], "o-", ms=3,
                 label=f"held-out {name}")
  axes[0].set_yscale("log")
  axes[0].set_title("losses")
  for name, ax in (("recall", axes[1]), ("exact", axes[2])):
    ax.plot([r["step"] for r in train], [r[name] for r in train], label="train", alpha=0.6)
    ax.plot([r["step"] for r in test], [r[name] for r in test], "o-", ms=3, label="held-out")
    ax.set_ylim(0, 1.02)
  axes[1].set_title("router recall@k (gold docs in top-k)")
  axes[2].set_title("rows with every target token right (teacher forced)")
  if copy:
    for name in ("copy_span_accuracy", "copy_lookup_accuracy"):
      axes[3].plot([r["step"] for r in copy], [r[name] for r in copy], "o-", ms=3,
                   label=f"held-out {name.split('_')[1]}")
    axes[3].set_ylim(0, 1.02)
    axes[3].set_title("copy batches: token accuracy")
  for ax in axes:
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  fig.savefig(_OUTPUT.value, dpi=110)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
