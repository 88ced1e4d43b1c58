"""Training curves of a run: loss terms, router recall, teacher-forced exact match (and copy accuracy).

Train curves are of memory batches only; a run with copy batches gets a fourth panel with the
held-out copy accuracies. Several workdirs (a recipe of runs, each starting from the previous
one's export) are drawn one after the other on one step axis, a dashed line at each boundary.

  python experiments/plot_training.py --workdir=out/demo --output=docs/demo_training.png
  python experiments/plot_training.py --workdir=out/demo,out/finetune --output=docs/recipe.png
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_list("workdir", None, "Training run directories, in recipe order.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "PNG to write.", required=True)


def main(argv):
  del argv
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train, test, bounds, offset = [], [], [], 0
  for workdir in _WORKDIR.value:
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    # A resumed run re-logs the steps after its last checkpoint: keep the latest row of each step.
    last = {r["step"]: r for r in rows if r["split"] == "train"}
    train += [{**r, "step": r["step"] + offset} for r in last.values()
              if r.get("batch", "memory") == "memory"]
    test += [{**r, "step": r["step"] + offset} for r in
             {r["step"]: r for r in rows if r["split"] == "test"}.values()]
    offset += max(last, default=0)
    bounds.append(offset)
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
    for name in ("copy_span_accuracy", "copy_lookup_accuracy", "copy_hop_accuracy",
                 "copy_hop_exact"):
      have = [r for r in copy if name in r]
      if have:
        axes[3].plot([r["step"] for r in have], [r[name] for r in have], "o-", ms=3,
                     label=f"held-out {name.removeprefix('copy_').replace('_accuracy', '')}")
    axes[3].set_ylim(0, 1.02)
    axes[3].set_title("copy batches: token accuracy (exact: whole rows)")
  for ax in axes:
    for b in bounds[:-1]:
      ax.axvline(b, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  fig.savefig(_OUTPUT.value, dpi=110)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
