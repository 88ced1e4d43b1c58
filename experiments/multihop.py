"""Multi-hop questions: MSA with Memory Interleave vs a single round, RAG, iterative RAG and bounds.

  python experiments/multihop.py                         # bridge + 2/3-hop chains, 16K and 64K
  python experiments/multihop.py --sizes=16K,64K,256K --per_task=32 --workdir=out/multihop

Tasks (msa_jax.data.multihop): `bridge` (the second hop's entity appears only in the first hop's
document, never in the question) and `chain_<k>` (k-hop variable chains). For each memory size,
the same questions are asked of memories built as in experiments/niah.py, by every method:

- msa_interleave: Memory Interleave, up to `--max_rounds` rounds (re-routing on question + new
  text); with the default `--naming=router_until_end` the model decides when retrieval ends and
  the router names one document (`--router_docs`) per round;
- msa_single: one round only (the documents found from the question alone);
- rag@k: BM25 (rank_bm25) top-k documents pasted into the prompt, for each k in --rag_k;
- iterative_rag: BM25 top-`--iter_k`, then again with the question + those documents' text,
  once per hop (the usual multi-step RAG);
- oracle: the gold documents pasted; no_context: none.

All methods use the same model and tokenizer, and answer in the same format (documents appended
as `[id]. text`). Prints accuracy (95% bootstrap interval), per-hop recall (fraction of each
hop's gold documents in the context) and mean documents used; writes <workdir>/multihop.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from msa_jax import demo  # noqa: E402
from msa_jax.engine.interleave import Naming  # noqa: E402
from msa_jax.studies import memory as study_memory  # noqa: E402
from msa_jax.studies import run  # noqa: E402
from msa_jax.studies.retrieval import BM25  # noqa: E402
from msa_jax.studies.sizes import format_size, parse_size  # noqa: E402

_MODEL = flags.DEFINE_string("model", None,
                             "Checkpoint directory (default: the shipped multi-hop model).")
_SIZES = flags.DEFINE_list("sizes", ["16K", "64K"], "Memory sizes in tokens.")
_TASKS = flags.DEFINE_list("tasks", ["bridge", "chain_2", "chain_3"], "Multi-hop tasks.")
_PER_TASK = flags.DEFINE_integer("per_task", 16, "Questions per task (the same at every size).")
_NAMING = flags.DEFINE_enum_class(
    "naming", Naming.ROUTER_UNTIL_END, Naming,
    "Who names the documents to append (the router or the model), and who ends retrieval.")
_ROUTER_DOCS = flags.DEFINE_integer("router_docs", 1, "Documents the router names per round.")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 3, "Interleave rounds.")
_RAG_K = flags.DEFINE_list("rag_k", ["1", "5", "10"], "BM25 top-k values for rag@k.")
_ITER_K = flags.DEFINE_integer("iter_k", 1, "Documents per step of iterative RAG.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out questions and fillers.")
_WORKDIR = flags.DEFINE_string("workdir", "out/multihop", "Output directory.")


def methods(memory, bm25: BM25):
  """name -> (kind, argument): MSA runs (max rounds) and pasted runs (a document chooser)."""
  hops = lambda q: len(q.hops)  # noqa: E731
  m = {"msa_interleave": ("msa", _MAX_ROUNDS.value), "msa_single": ("msa", 1)}
  for k in _RAG_K.value:
    m[f"rag@{k}"] = ("pasted", lambda q, k=int(k): bm25.top(q.question, k))
  m["iterative_rag"] = ("pasted", lambda q: bm25.iterative(q.question, memory.texts,
                                                           _ITER_K.value, hops(q)))
  m["oracle"] = ("pasted", lambda q: sorted({x for h in q.hops for x in h}))
  m["no_context"] = ("pasted", lambda q: [])
  return m


def main(argv):
  del argv
  model, tok, data = demo.load(_MODEL.value or demo.Shipped.MULTIHOP)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = []
  for label in _SIZES.value:
    size = parse_size(label)
    t0 = time.time()
    memories = study_memory.build(_TASKS.value, _PER_TASK.value, size, doc_chars=data.doc_chars,
                                  docs_per_example=data.docs_per_example, seed=_SEED.value)
    outcomes: dict[str, list] = {}
    for mem in memories:
      built = run.encode(model, tok, mem)
      bm25 = BM25(mem.texts)
      for name, (kind, arg) in methods(mem, bm25).items():
        if kind == "msa":
          got = run.ask_msa(built, tok, mem, naming=_NAMING.value, router_docs=_ROUTER_DOCS.value,
                            max_rounds=arg)
        else:
          got = run.ask_pasted(model, tok, mem, arg)
        outcomes.setdefault(name, []).extend(got)
    summary = {name: run.summarize(o) for name, o in outcomes.items()}
    results.append({"size": size, "label": format_size(size), "memories": len(memories),
                    "methods": summary, "seconds": time.time() - t0})
    print(f"{format_size(size)} ({len(memories)} memories, {time.time() - t0:.0f} s)")
    print(f"  {'method':<15} {'acc':>5} {'95% CI':>13} {'hop recall':>17} {'docs':>5}")
    for name, s in summary.items():
      a = s["all"]
      lo, hi = a["accuracy_ci95"]
      hr = " ".join(f"{r:.2f}" for r in a["hop_recall"])
      print(f"  {name:<15} {a['accuracy']:5.2f} [{lo:4.2f}, {hi:4.2f}] {hr:>17} {a['docs']:5.1f}",
            flush=True)
  out = {"model": _MODEL.value or "shipped multi-hop model", "naming": _NAMING.value.value,
         "router_docs": _ROUTER_DOCS.value, "tasks": _TASKS.value, "per_task": _PER_TASK.value,
         "sizes": results}
  path = os.path.join(_WORKDIR.value, "multihop.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, path)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
