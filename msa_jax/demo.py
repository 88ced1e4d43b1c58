"""The shipped demo model: a small MSA model trained from scratch on synthetic NIAH.

Its recipe is two runs: `experiments/configs/demo.py` (routing), then
`experiments/configs/finetune_copy.py` (copying answers from the documents the router names). `load()` returns the model, its tokenizer and the
memory layout it was trained on (`DemoData`), so that evaluations can build memories of the same
kind. The checkpoint is the HF layout of SPEC §11 under `msa_jax/assets/demo_model`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib

from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.interop import hf
from msa_jax.nn.model import MSAForCausalLM, from_params


def path() -> pathlib.Path:
  return pathlib.Path(str(importlib.resources.files("msa_jax") / "assets" / "demo_model"))


@dataclasses.dataclass(frozen=True)
class DemoData:
  """The memory layout of the demo model's training batches (see `msa_jax.train.batches`)."""

  doc_chars: int  # target characters per document
  docs_per_example: int  # documents each example contributes to a memory
  examples_per_memory: int  # examples whose documents share one memory
  id_digits: tuple[int, int]

  @property
  def memory_docs(self) -> int:
    return self.docs_per_example * self.examples_per_memory


def load(directory: str | pathlib.Path | None = None
         ) -> tuple[MSAForCausalLM, ByteTokenizer, DemoData]:
  d = pathlib.Path(directory) if directory is not None else path()
  cfg, params = hf.load_checkpoint(d)
  info = json.loads((d / "training.json").read_text())["data"]
  data = DemoData(doc_chars=info["doc_chars"], docs_per_example=info["docs_per_example"],
                  examples_per_memory=info["examples_per_memory"],
                  id_digits=tuple(info["id_digits"]))
  return from_params(cfg, params), ByteTokenizer(), data
