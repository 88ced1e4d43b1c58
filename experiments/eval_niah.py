"""Held-out NIAH accuracy and document recall of a trained model, end to end through the engine.

  python experiments/eval_niah.py                       # the shipped demo model, all 8 variants
  python experiments/eval_niah.py --model=out/demo/model --examples=96 --output=out/eval.json
  python experiments/eval_niah.py --naming=model        # the model names the documents

Memories have the layout the model was trained on (documents of `doc_chars` characters,
`docs_per_example` documents per example, `examples_per_memory` examples per memory), built from
the TEST split, whose keys and values never occur in training.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from msa_jax import demo  # noqa: E402
from msa_jax.data import niah  # noqa: E402
from msa_jax.engine.interleave import Naming  # noqa: E402
from msa_jax.train import evaluate  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Checkpoint directory (default: the shipped demo).")
_TASKS = flags.DEFINE_list("tasks", [v.value for v in niah.Variant], "Tasks to evaluate.")
_EXAMPLES = flags.DEFINE_integer("examples", 48, "Held-out questions per task.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out stream.")
_NAMING = flags.DEFINE_enum_class("naming", Naming.ROUTER, Naming,
                                  "Who names the documents to append: the model or the router.")
# The demo model answers from one pasted needle; it has not learned to name documents itself or
# to pick the matching key among several pasted needles (BUILD_NOTES.md, "Training").
_ROUTER_DOCS = flags.DEFINE_integer("router_docs", 1,
                                    "Documents the router names (--naming=router).")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 1, "Retrieval rounds at most (NIAH needs one).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")


def main(argv):
  del argv
  model, tok, data = demo.load(_MODEL.value)
  rows = []
  print(f"{'task':<18} {'n':>4} {'accuracy':>9} {'exact':>6} {'recall@k':>9} {'named':>6} {'docs':>5} {'s':>6}")
  for task in _TASKS.value:
    t0 = time.time()
    r = evaluate.evaluate_task(model, tok, task, num_examples=_EXAMPLES.value,
                               docs_per_example=data.docs_per_example, doc_chars=data.doc_chars,
                               group=data.examples_per_memory, seed=_SEED.value,
                               id_digits=data.id_digits, naming=_NAMING.value,
                               router_docs=_ROUTER_DOCS.value, max_rounds=_MAX_ROUNDS.value)
    rows.append({**r.as_dict(), "seconds": time.time() - t0})
    print(f"{task:<18} {r.n:>4} {r.accuracy:>9.3f} {r.exact:>6.3f} {r.recall:>9.3f} {r.retrieved_recall:>6.3f} "
          f"{r.docs:>5.2f} {time.time() - t0:>6.1f}", flush=True)
  result = {"model": _MODEL.value or "shipped demo", "top_k": model.cfg.msa.top_k_docs,
            "memory_docs": data.memory_docs, "naming": _NAMING.value.value, "max_rounds": _MAX_ROUNDS.value, "tasks": rows}
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
