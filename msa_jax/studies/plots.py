"""Plots of study results (matplotlib, Agg), in the style of the paper's accuracy-vs-length figures."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str) -> None:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def scaling(result: dict, path: str) -> None:
  """Accuracy, recall@k and latency vs memory size (log x): one line per task, dense dashed."""
  sizes = result["sizes"]
  x = [s["tokens_per_memory"] for s in sizes]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  tasks = list(result["tasks"])
  cmap = plt.get_cmap("tab10")
  for i, t in enumerate(tasks + ["all"]):
    style = dict(color="black", linewidth=2.5) if t == "all" else dict(color=cmap(i), linewidth=1.2)
    acc = [s["msa"][t]["accuracy"] if t in s["msa"] else None for s in sizes]
    rec = [s["msa"][t]["recall"] if t in s["msa"] else None for s in sizes]
    axes[0].plot(x, acc, marker="o", label=f"MSA {t}", **style)
    axes[1].plot(x, rec, marker="o", label=t, **style)
  dense = [(xi, s["dense"]["all"]["accuracy"]) for xi, s in zip(x, sizes) if s.get("dense")]
  if dense:
    axes[0].plot(*zip(*dense), "k--", marker="s", linewidth=2, label="dense (all)")
  lat = [s["msa"]["all"]["latency_s"] for s in sizes]
  axes[2].plot(x, lat, "k-o", label="MSA")
  dl = [(xi, s["dense"]["all"]["latency_s"]) for xi, s in zip(x, sizes) if s.get("dense")]
  if dl:
    axes[2].plot(*zip(*dl), "k--s", label="dense")
  titles = ["answer accuracy (string_match_all)", f"document recall@{result['top_k']}",
            "per-query latency (s)"]
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_xlabel("memory size (tokens)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  axes[0].set_ylim(-0.02, 1.02)
  axes[1].set_ylim(-0.02, 1.02)
  axes[2].set_yscale("log")
  axes[0].legend(fontsize=7, loc="lower left")
  axes[2].legend(fontsize=8)
  fig.suptitle(f"NIAH vs memory size ({result['model']}, documents named by {result['naming']})")
  _save(fig, path)


def settings(runs: dict[str, dict], path: str) -> None:
  """Accuracy (all variants, and the single-needle ones) and router recall@1 vs memory size for
  several NIAH runs (name -> niah.json), MSA solid, BM25 top-1 (equal documents) dashed."""
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  cmap = plt.get_cmap("tab10")
  for i, (name, result) in enumerate(runs.items()):
    sizes = result["sizes"]
    x = [s["tokens_per_memory"] for s in sizes]
    single = [t for t in result["tasks"] if t.startswith("niah_single")]

    def mean_acc(summary: dict, tasks) -> float | None:
      got = [summary[t]["accuracy"] for t in tasks if t in summary]
      return sum(got) / len(got) if got else None

    style = dict(color=cmap(i), marker="o")
    axes[0].plot(x, [s["msa"]["all"]["accuracy"] for s in sizes], label=f"MSA, {name}", **style)
    rag = [(xi, s["rag"]["rag@1"]["all"]["accuracy"]) for xi, s in zip(x, sizes)
           if "rag@1" in s.get("rag", {})]
    if rag:
      axes[0].plot(*zip(*rag), linestyle="--", color=cmap(i), marker="s",
                   label=f"BM25 top-1, {name}")
    if single:
      axes[1].plot(x, [mean_acc(s["msa"], single) for s in sizes], label=f"MSA, {name}",
                   **style)
    axes[2].plot(x, [s["msa"]["all"].get("recall_at_1") for s in sizes], label=name, **style)
  titles = ["accuracy, all variants asked", "accuracy, single-needle variants",
            "router recall@1 (best document is gold)"]
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_xlabel("memory size (tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
  fig.suptitle("NIAH vs memory size, by haystack setting")
  _save(fig, path)
