"""`implementation=` dispatch shared by the ops (tokamax style): "xla" always works."""

from __future__ import annotations

from typing import Literal, get_args

import jax

Implementation = Literal["xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)


def default_implementation() -> Implementation:
  """"pallas" on GPU, "xla" everywhere else (the Pallas kernels target GPU)."""
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve(implementation: Implementation | None) -> Implementation:
  if implementation is None:
    return default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS} or None")
  return implementation


def interpret() -> bool:
  """Pallas kernels run compiled on GPU and in the Pallas interpreter elsewhere (CPU tests)."""
  return jax.default_backend() != "gpu"
