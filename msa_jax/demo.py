"""The shipped models: small MSA models trained from scratch on synthetic tasks.

- `Shipped.NIAH` (the demo model): `experiments/configs/demo.py` (routing), then
  `experiments/configs/finetune_demo.py` (copying answers from the documents the router names).
- `Shipped.MULTIHOP`: the demo model fine-tuned for Memory Interleave on the multi-hop tasks
  (`multihop_copy.py`, `multihop_router.py`, `multihop_route.py`, `multihop_answer.py`,
  `multihop_bridge.py`, `multihop_final.py`).

`load()` returns a model, its tokenizer and the memory layout it was trained on (`DemoData`), so
that evaluations can build memories of the same kind. Each checkpoint is the HF layout of SPEC §11
under `msa_jax/assets/`, with its tokenizer.json (`tokenizer.byte_tokenizer_json()`); `load()`
returns the equivalent ByteTokenizer, which gives the same ids without the `tokenizers` library.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import json
import pathlib

from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.interop import hf
from msa_jax.nn.model import MSAForCausalLM, from_params


class Shipped(enum.Enum):
  """The checkpoints under `msa_jax/assets/`, by directory name."""

  NIAH = "demo_model"
  MULTIHOP = "multihop_model"


def path(model: Shipped = Shipped.NIAH) -> pathlib.Path:
  return pathlib.Path(str(importlib.resources.files("msa_jax") / "assets" / model.value))


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


def load(directory: str | pathlib.Path | Shipped | None = None
         ) -> tuple[MSAForCausalLM, ByteTokenizer, DemoData]:
  """A checkpoint directory, or a shipped model (default: the NIAH demo model)."""
  if directory is None or isinstance(directory, Shipped):
    d = path(directory or Shipped.NIAH)
  else:
    d = pathlib.Path(directory)
  cfg, params = hf.load_checkpoint(d)
  info = json.loads((d / "training.json").read_text())["data"]
  data = DemoData(doc_chars=info["doc_chars"], docs_per_example=info["docs_per_example"],
                  examples_per_memory=info["examples_per_memory"],
                  id_digits=tuple(info["id_digits"]))
  return from_params(cfg, params), ByteTokenizer(), data
