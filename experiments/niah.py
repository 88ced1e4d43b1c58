"""NIAH accuracy, document recall@k and per-query latency versus memory size, MSA and dense.

  python experiments/niah.py                                   # 16K..1M tokens, minutes on CPU
  python experiments/niah.py --sizes=10M,100M --workdir=out/niah_large   # long job, resumable

For every size, the memories (see `msa_jax.studies.memory`) hold the same questions (`--per_task`
per NIAH variant). `--distractors=none` (default) is RULER's protocol: each variant's own
haystack (noise, essay prose, or distractor needles whose keys are never asked) extended to the
size, holding only the asked needles; variants with the same kind of haystack share a memory.
`--distractors=filler_needles` is the harder setting (filler examples with their own needles,
all variants in one memory). `--haystack_dir=DIR` replaces the generated essay prose by the
sentences of DIR's .txt files (e.g. tests/data/prose). Every asked key is checked to occur only in
its gold documents; each memory is encoded once (stage 1; sizes from
`--disk_from` on go to a resumable on-disk bank under <workdir>/banks) and every variant's
questions are asked of it through Memory Interleave. The dense baseline asks the same model with
every document of the memory pasted into its prompt (ordinary causal attention, no routing), for
sizes up to `--dense_max`; the RAG baseline pastes BM25's top-k documents (`--rag_k`). Prints a table per size; writes <workdir>/niah.json (per size, per
task: accuracy with a 95% bootstrap interval, recall@k, documents used, median latency; encode
time, bank size) and <workdir>/niah.png (accuracy, recall and latency vs memory size, log x).
A finished size is kept in <workdir>/sizes/<size>.json and skipped when the command is rerun.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from msa_jax import demo  # noqa: E402
from msa_jax.data import niah as niah_data  # noqa: E402
from msa_jax.engine.interleave import Naming  # noqa: E402
from msa_jax.studies import memory as study_memory  # noqa: E402
from msa_jax.studies import plots, run  # noqa: E402
from msa_jax.studies.retrieval import BM25  # noqa: E402
from msa_jax.studies.sizes import format_size, parse_size  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Checkpoint directory (default: the shipped demo).")
_SIZES = flags.DEFINE_list("sizes", ["16K", "64K", "256K", "1M"],
                           "Memory sizes in tokens (K = 1e3, M = 1e6).")
_TASKS = flags.DEFINE_list("tasks", [v.value for v in niah_data.Variant], "NIAH variants.")
_PER_TASK = flags.DEFINE_integer("per_task", 4, "Questions per variant (the same at every size).")
_NAMING = flags.DEFINE_enum_class("naming", Naming.ROUTER, Naming,
                                  "Who names the documents to append: the router or the model.")
_ROUTER_DOCS = flags.DEFINE_integer("router_docs", 1, "Documents the router names per round "
                                    "(the demo model copies from one pasted needle).")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 1, "Retrieval rounds (NIAH needs one).")
_DENSE_MAX = flags.DEFINE_string("dense_max", "16K", "Largest size run with the dense baseline "
                                 "(0: none). Its cost grows with the square of the size.")
_DENSE_PER_TASK = flags.DEFINE_integer("dense_per_task", 2, "Questions per variant, dense.")
_RAG_K = flags.DEFINE_list("rag_k", ["1", "5", "10"], "BM25 top-k of the RAG baseline (empty: none).")
_DISK_FROM = flags.DEFINE_string("disk_from", "1M", "Sizes from this one on are encoded into an "
                                 "on-disk bank (resumable), smaller ones in memory.")
_KEEP_BANKS = flags.DEFINE_bool("keep_banks", True, "Keep on-disk banks after their size is done.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out questions and fillers.")
_DISTRACTORS = flags.DEFINE_enum_class(
    "distractors", study_memory.Distractors.NONE, study_memory.Distractors,
    "none: RULER's haystacks (each variant's own kind, only the asked needles); filler_needles: "
    "the harder setting (filler examples' needles everywhere).")
_HAYSTACK_DIR = flags.DEFINE_string("haystack_dir", None, "A directory of .txt files whose "
                                    "sentences replace the generated essay haystack.")
_WORKDIR = flags.DEFINE_string("workdir", "out/niah", "Output directory.")


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _print_table(name: str, summary: dict, tasks) -> None:
  """r@1: the router's best document is gold; recall: recall@k; rank: median best gold rank among
  the routed documents (>k: beyond them); in ctx: gold documents whose text was in the context."""
  print(f"  {name}: {'task':<17} {'acc':>5} {'95% CI':>13} {'r@1':>5} {'recall':>6} "
        f"{'rank':>5} {'in ctx':>6} {'docs':>5} {'lat s':>6}")
  for t in [t for t in tasks if t != "all"] + ["all"]:
    if t not in summary:
      continue
    s = summary[t]
    rec = "  -   " if s["recall"] is None else f"{s['recall']:6.3f}"
    r1 = "  -  " if s.get("recall_at_1") is None else f"{s['recall_at_1']:5.2f}"
    rank = ("  -  " if s.get("recall_at_1") is None else
            "  >k " if s.get("median_gold_rank") is None else f"{s['median_gold_rank']:5.1f}")
    lo, hi = s["accuracy_ci95"]
    print(f"  {'':<{len(name)}}  {t:<17} {s['accuracy']:5.2f} [{lo:4.2f}, {hi:4.2f}] {r1} {rec} "
          f"{rank} {s['hop_recall'][0]:6.3f} {s['docs']:5.1f} {s['latency_s']:6.2f}", flush=True)


def run_size(model, tok, data, size: int, workdir: str) -> dict:
  t0 = time.time()
  essay = study_memory.load_essay(_HAYSTACK_DIR.value) if _HAYSTACK_DIR.value else None
  memories = study_memory.build(_TASKS.value, _PER_TASK.value, size, doc_chars=data.doc_chars,
                                docs_per_example=data.docs_per_example, seed=_SEED.value,
                                distractors=_DISTRACTORS.value, essay=essay)
  on_disk = size >= parse_size(_DISK_FROM.value)
  msa, dense, encode_s, bank_bytes, tokens = [], [], 0.0, 0, 0
  rag: dict[str, list] = {k: [] for k in _RAG_K.value}
  dense_asked: dict[str, int] = {}
  for g, mem in enumerate(memories):
    bank_dir = (os.path.join(workdir, "banks", f"{format_size(size)}-{g}") if on_disk else None)
    built = run.encode(model, tok, mem, bank_dir=bank_dir, log=print if on_disk else None)
    encode_s += built.encode_s
    bank_bytes += built.bank_bytes
    tokens += int(mem.rendered(tok)[1].sum())
    msa += run.ask_msa(built, tok, mem, naming=_NAMING.value, router_docs=_ROUTER_DOCS.value,
                       max_rounds=_MAX_ROUNDS.value)
    if size <= parse_size(_DENSE_MAX.value):
      # The first --dense_per_task questions of each task over all memories of this size.
      qs = []
      for q in mem.questions:
        if dense_asked.get(q.task, 0) < _DENSE_PER_TASK.value:
          dense_asked[q.task] = dense_asked.get(q.task, 0) + 1
          qs.append(q)
      dense += run.ask_pasted(model, tok, mem, lambda q, n=len(mem.texts): range(n), questions=qs)
    if rag:
      bm25 = BM25(mem.texts)
      for k in rag:
        rag[k] += run.ask_pasted(model, tok, mem, lambda q, k=int(k): bm25.top(q.question, k))
    if bank_dir and not _KEEP_BANKS.value:
      shutil.rmtree(bank_dir)
  result = {"size": size, "label": format_size(size), "memories": len(memories),
            "haystacks": [f"{m.haystack}: {len(m.questions)} questions" for m in memories],
            "tokens_per_memory": tokens / len(memories), "docs_per_memory":
            sum(len(m.texts) for m in memories) / len(memories),
            "encode_s": encode_s, "bank_bytes": bank_bytes,
            "msa": run.summarize(msa), "dense": run.summarize(dense) if dense else None,
            "rag": {f"rag@{k}": run.summarize(v) for k, v in rag.items()},
            "seconds": time.time() - t0}
  return result


def main(argv):
  del argv
  model, tok, data = demo.load(_MODEL.value)
  os.makedirs(os.path.join(_WORKDIR.value, "sizes"), exist_ok=True)
  results = []
  for label in _SIZES.value:
    size = parse_size(label)
    path = os.path.join(_WORKDIR.value, "sizes", f"{format_size(size)}.json")
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      print(f"{format_size(size)}: done earlier ({path})")
    else:
      print(f"{format_size(size)}: building and asking ...", flush=True)
      result = run_size(model, tok, data, size, _WORKDIR.value)
      _write_json(path, result)
    results.append(result)
    print(f"{result['label']}: {result['memories']} memor{'y' if result['memories'] == 1 else 'ies'}"
          f" of {result['tokens_per_memory']:,.0f} tokens, encode {result['encode_s']:.1f} s, "
          f"bank {result['bank_bytes'] / 2**20:.1f} MiB on disk")
    if result.get("haystacks"):
      print(f"  memories: {'; '.join(result['haystacks'])}")
    _print_table("MSA", result["msa"], _TASKS.value)
    if result["dense"]:
      _print_table("dense", result["dense"], _TASKS.value)
    for name, summary in result.get("rag", {}).items():
      _print_table(name, summary, [])
  out = {"model": _MODEL.value or "shipped demo", "naming": _NAMING.value.value,
         "distractors": _DISTRACTORS.value.value, "haystack_dir": _HAYSTACK_DIR.value,
         "router_docs": _ROUTER_DOCS.value, "top_k": model.cfg.msa.top_k_docs,
         "per_task": _PER_TASK.value, "tasks": _TASKS.value, "sizes": results}
  _write_json(os.path.join(_WORKDIR.value, "niah.json"), out)
  plots.scaling(out, os.path.join(_WORKDIR.value, "niah.png"))
  print(f"wrote {os.path.join(_WORKDIR.value, 'niah.json')} and niah.png")


if __name__ == "__main__":
  app.run(main)
