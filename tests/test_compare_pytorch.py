"""experiments/compare_pytorch.py: msa-jax's dense forward against transformers' Qwen3, and the fixture.

The binary's `main` runs in-process on the official tiny checkpoint (a subprocess would spend most
of its time importing jax, torch and transformers again); its checks are shown to fail on
perturbed outputs.
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from absl import flags  # noqa: E402
from absl.testing import flagsaver  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
CKPT = ROOT / "tests" / "data" / "official_msa_tiny" / "ckpt"
KEYS = {"checkpoint", "batch", "length", "max_abs_logit_diff", "jax_tokens_per_s",
        "torch_tokens_per_s", "ratio", "devices", "versions", "fixture", "tolerance", "ok"}


@pytest.fixture(scope="module")
def cp():
  """The binary as a module (imported once: its absl flags may be defined only once)."""
  if "compare_pytorch" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "compare_pytorch", ROOT / "experiments" / "compare_pytorch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_pytorch"] = module
    spec.loader.exec_module(module)
  return sys.modules["compare_pytorch"]


def _run_main(cp, *args: str) -> int:
  with flagsaver.flagsaver():
    flags.FLAGS(["compare_pytorch.py", *args])
    try:
      return cp.main([])
    finally:
      flags.FLAGS.unparse_flags()


def test_main_on_the_official_tiny_checkpoint_writes_json(cp, tmp_path, capsys):
  out = tmp_path / "sub" / "compare.json"
  rc = _run_main(cp, f"--checkpoint={CKPT}", "--batch=1", "--length=32", "--repeats=1",
                 "--torch_threads=1", "--attn_implementation=eager", f"--output={out}")
  printed = capsys.readouterr().out
  assert rc == 0, printed
  assert "ratio JAX/PyTorch tokens/s" in printed
  r = json.loads(out.read_text())
  assert KEYS <= set(r)
  assert r["checkpoint"] == str(CKPT) and (r["batch"], r["length"]) == (1, 32)
  assert r["ok"] is True
  assert r["max_abs_logit"] > 1.0  # not a trivially small comparison
  assert 0 <= r["max_abs_logit_diff"] < 1e-4
  assert r["jax_tokens_per_s"] > 0 and r["torch_tokens_per_s"] > 0
  assert r["ratio"] == pytest.approx(r["jax_tokens_per_s"] / r["torch_tokens_per_s"])
  assert set(r["versions"]) == {"jax", "torch", "transformers"}
  assert set(r["devices"]) == {"jax", "torch"}
  fixture = r["fixture"]
  assert {"logits", "selected_docs_L2", "selected_docs_L3", "doc_scores_L2", "loss"} <= set(fixture)
  assert all(row["ok"] for row in fixture.values())
  assert fixture["logits"]["max_abs_diff"] < 1e-5
  assert fixture["selected_docs_L2"]["verdict"] == "identical"
  assert not list(out.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def _outputs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 10)).astype(np.float32)
  valid = np.ones((2, 6), bool)
  valid[1, 4:] = False
  ours = {"logits": logits, "doc_scores_L2": np.array([[-np.inf, 0.5, 0.25]], np.float32),
          "selected_docs_L2": np.array([[1, 2]]), "loss": np.float32(3.0)}
  return ours, {k: np.copy(v) for k, v in ours.items()}, valid


def test_compare_arrays_passes_identical_outputs(cp):
  ours, ref, valid = _outputs()
  ref["logits"][1, 5] += 1.0  # a padding token: not compared
  rows = cp.compare_arrays(ours, ref, valid)
  assert set(rows) == set(ours)
  assert all(r["ok"] and r["max_abs_diff"] == 0.0 for r in rows.values())


@pytest.mark.parametrize("name, perturb", [
    ("logits", lambda a: a.__setitem__((0, 3, 2), a[0, 3, 2] + 1e-4)),
    ("doc_scores_L2", lambda a: a.__setitem__((0, 1), a[0, 1] + 1e-5)),
    ("doc_scores_L2", lambda a: a.__setitem__((0, 0), 0.0)),  # -inf pattern differs
    ("selected_docs_L2", lambda a: a.__setitem__((0, 1), 3)),
])
def test_compare_arrays_flags_a_perturbed_array(cp, name, perturb):
  ours, ref, valid = _outputs()
  perturb(ref[name])
  rows = cp.compare_arrays(ours, ref, valid)
  assert [n for n, r in rows.items() if not r["ok"]] == [name]
  assert cp.failures({"max_abs_logit_diff": 0.0, "fixture": rows}, 1e-3)


def test_compare_arrays_holds_losses_to_a_relative_tolerance(cp):
  ours, ref, valid = _outputs()
  ref["loss"] = np.float32(3.0 + 2e-5)  # within 1e-5 relative of 3.0
  assert cp.compare_arrays(ours, ref, valid)["loss"]["ok"]
  ref["loss"] = np.float32(3.0 + 1e-4)
  assert not cp.compare_arrays(ours, ref, valid)["loss"]["ok"]


@pytest.mark.parametrize("diff, fails", [(0.0, False), (1e-3, False), (2e-3, True),
                                         (float("nan"), True), (float("inf"), True)])
def test_failures_checks_the_logit_tolerance(cp, diff, fails):
  assert bool(cp.failures({"max_abs_logit_diff": diff, "fixture": None}, 1e-3)) == fails


def test_an_empty_fixture_comparison_fails(cp):
  assert cp.failures({"max_abs_logit_diff": 0.0, "fixture": {}}, 1e-3)
