"""Shared test set-up: two simulated CPU devices (for sharding tests) and the official fixtures."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"
OFFICIAL = DATA / "official_msa_tiny"


@pytest.fixture(scope="session")
def official_dir() -> pathlib.Path:
  return OFFICIAL


@pytest.fixture(scope="session")
def official_model():
  """(cfg, params) of the official decoupled tiny checkpoint."""
  from msa_jax.interop import hf
  return hf.load_checkpoint(OFFICIAL / "ckpt")


@pytest.fixture(scope="session")
def official_model_nodecouple():
  from msa_jax.interop import hf
  return hf.load_checkpoint(OFFICIAL / "ckpt_nodecouple")


def load_npz(name: str) -> dict[str, np.ndarray]:
  with np.load(OFFICIAL / name) as f:
    return dict(f)


def official_request_files(d: pathlib.Path) -> dict[str, np.ndarray]:
  """Writes the official inference fixture's documents (d/docs.npz: tokens, lengths, template)
  and stage-2 request (d/req.npz) for the command line; returns the fixture's arrays."""
  ref = load_npz("fixture_inference.npz")
  np.savez(d / "docs.npz", tokens=ref["memory_doc_tokens"], lengths=ref["memory_doc_lens_tokens"],
           template=ref["template_head_ids"])
  np.savez(d / "req.npz", **{k: ref["stage2_" + k] for k in
                             ("input_ids", "doc_ids", "attention_mask", "position_ids")})
  return ref
