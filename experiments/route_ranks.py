"""The router's ranking of each retrieval round's gold document on held-out training batches.

  python experiments/route_ranks.py                                  # the shipped multi-hop model
  python experiments/route_ranks.py --model=out/multihop_route/model --batches=3

For each task and round: held-out (TEST split) route batches of the model's training layout, every
row of one task (`same_task`), each row at that round — the question plus the earlier rounds'
documents pasted, those documents left out of the ranking as the engine never names them again.
Prints the fraction of rows whose gold document ranks first, in the top 8, and the median rank
(best over router layers; exact routing); writes <output> as JSON when given.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from msa_jax import demo  # noqa: E402
from msa_jax.data import synthetic  # noqa: E402
from msa_jax.data.text import Split  # noqa: E402
from msa_jax.train import batches, evaluate  # noqa: E402

_MODEL = flags.DEFINE_string("model", None,
                             "Checkpoint directory (default: the shipped multi-hop model).")
_TASKS = flags.DEFINE_list("tasks", ["bridge", "chain_2", "chain_3", "niah_single_2"], "Tasks.")
_BATCHES = flags.DEFINE_integer("batches", 3, "Held-out batches per task and round.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out stream.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")


def rounds_of(task: str) -> int:
  ex = synthetic.example(task, seed=0, split=Split.TEST, index=0, num_docs=3, doc_chars=160)
  return len(batches.rounds_of(ex))


def main(argv):
  del argv
  model, tok, data = demo.load(_MODEL.value or demo.Shipped.MULTIHOP)
  rows = []
  print(f"{'task':<16} {'round':>5} {'rows':>5} {'top1':>6} {'top8':>6} {'median':>7}")
  for task in _TASKS.value:
    for r in range(rounds_of(task)):
      spec = batches.BatchSpec(
          tasks=batches.TaskMix.parse(task), rows=data.examples_per_memory,
          docs_per_example=data.docs_per_example, doc_chars=data.doc_chars,
          doc_len=batches.doc_len_for(data.doc_chars, model.cfg.msa.pooling_size),
          answer_fraction=0.0, top_k=model.cfg.msa.top_k_docs, id_digits=data.id_digits,
          seed=_SEED.value, split=Split.TEST, same_task=True, first_route_round=r)
      ranks = evaluate.route_ranks(model, tok, spec, _BATCHES.value)
      row = {"task": task, "round": r + 1, "rows": int(ranks.size),
             "top1": float(np.mean(ranks == 0)), "top8": float(np.mean(ranks < 8)),
             "median_rank": float(np.median(ranks))}
      rows.append(row)
      print(f"{task:<16} {r + 1:>5} {ranks.size:>5} {row['top1']:>6.2f} {row['top8']:>6.2f} "
            f"{row['median_rank']:>7.0f}", flush=True)
  if _OUTPUT.value:
    tmp = _OUTPUT.value + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"model": _MODEL.value or "shipped multi-hop model", "rows": rows}, f, indent=2)
    os.replace(tmp, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
