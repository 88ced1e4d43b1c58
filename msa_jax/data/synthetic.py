"""Synthetic tasks by name: the one place that maps "niah_single_1", "bridge", "chain_k" to a
generator (NIAH variants by value; BRIDGE has 2 hops; CHAIN has k)."""

from collections.abc import Callable

from msa_jax.data import multihop, niah
from msa_jax.data.text import Split


def generator(name: str) -> Callable[..., niah.Example]:
  """A callable (seed, split, index, num_docs, doc_chars, id_digits) -> Example for a task name."""
  if name.startswith("niah_"):
    variant = niah.Variant(name)
    return lambda **kw: niah.example(variant, **kw)
  if name == "bridge":
    return lambda **kw: multihop.example(multihop.HopTask.BRIDGE, hops=2, **kw)
  if name.startswith("chain_"):
    hops = name.split("_")[1]
    if not hops.isdigit():
      raise ValueError(f"unknown task {name!r}: chain_<hops>, e.g. chain_2")
    return lambda **kw: multihop.example(multihop.HopTask.CHAIN, hops=int(hops), **kw)
  raise ValueError(f"unknown task {name!r}")


def example(name: str, *, seed: int, split: Split, index: int, num_docs: int,
            doc_chars: int, id_digits: tuple[int, int] = (1, 6)) -> niah.Example:
  return generator(name)(seed=seed, split=split, index=index, num_docs=num_docs,
                         doc_chars=doc_chars, id_digits=id_digits)


def hops_of(name: str) -> int:
  """Retrieval rounds a task needs (NIAH: 1)."""
  generator(name)  # validates, so a malformed name gets the message above
  if name == "bridge":
    return 2
  if name.startswith("chain_"):
    return int(name.split("_")[1])
  return 1
