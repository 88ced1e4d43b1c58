"""Experiment binaries run end to end on their defaults."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_official_parity_binary_writes_json(tmp_path):
  out = tmp_path / "parity.json"
  subprocess.run([sys.executable, str(ROOT / "experiments" / "official_parity.py"),
                  f"--output={out}"], check=True, capture_output=True, timeout=300)
  results = json.loads(out.read_text())
  assert set(results) == {"fixture.npz", "fixture_partial_nodecouple.npz"}
  for rows in results.values():
    assert rows["selected_docs_L2"] == "identical" and rows["selected_docs_L3"] == "identical"
    assert float(rows["logits"].split()[-1]) < 1e-5


# --- training ------------------------------------------------------------------------------------

TRAIN = [sys.executable, str(ROOT / "experiments" / "train.py"),
         f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}"]


def _finished_steps(workdir):
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One uninterrupted run of the tiny config (shared: it is also the resume test's reference)."""
  workdir = tmp_path_factory.mktemp("tiny_run")
  subprocess.run(TRAIN + [f"--workdir={workdir}"], check=True, capture_output=True, timeout=600)
  return workdir


def test_train_binary_writes_metrics_events_checkpoints_and_model(tiny_run, tmp_path):
  from msa_jax.interop import hf
  run = tiny_run
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in train)
  assert any(r["split"] == "test" for r in rows)
  assert list((run / "tb").glob("events.out.tfevents.*"))
  assert _finished_steps(run)[-1] == 6
  cfg, params = hf.load_checkpoint(run / "model")
  assert cfg.msa.router_layers == (2, 3) and cfg.hidden_size == 32
  png = tmp_path / "curves.png"  # the run twice: a recipe of two runs on one step axis
  subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_training.py"),
                  f"--workdir={run},{run}", f"--output={png}"], check=True, capture_output=True,
                 timeout=300)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The evaluation binary runs the exported model end to end through the engine.
  out = tmp_path / "eval.json"
  subprocess.run([sys.executable, str(ROOT / "experiments" / "eval_niah.py"),
                  f"--model={run / 'model'}", "--tasks=niah_single_1,niah_multivalue",
                  "--examples=2", f"--output={out}"], check=True, capture_output=True, timeout=600)
  result = json.loads(out.read_text())
  assert [r["task"] for r in result["tasks"]] == ["niah_single_1", "niah_multivalue"]
  for r in result["tasks"]:
    assert r["n"] == 2 and 0 <= r["accuracy"] <= 1 and 0 <= r["recall"] <= 1
    assert 0 <= r["exact"] <= r["accuracy"]  # an exact answer holds every value


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")
                                         if p.stem != "__init__"))
def test_every_committed_config_builds_a_run_and_documents_its_command(name):
  import importlib
  from msa_jax.train import recipe
  sys.path.insert(0, str(ROOT))
  module = importlib.import_module(f"experiments.configs.{name}")
  c = module.get_config()
  run, _ = recipe.run_config(c, recipe.model_config(c))
  assert run.total_steps > 0
  assert f"--config=experiments/configs/{name}.py" in module.__doc__


def test_a_run_starts_from_an_exported_checkpoint_of_the_same_architecture(tiny_run):
  import jax
  import numpy as np
  from flax import nnx
  from msa_jax.interop import hf
  from msa_jax.train import recipe
  sys.path.insert(0, str(ROOT))
  from experiments.configs import tiny
  c = tiny.get_config()
  _, exported = hf.load_checkpoint(tiny_run / "model")
  fresh = nnx.to_pure_dict(nnx.state(recipe.initial_model(c)))
  c.init_from = str(tiny_run / "model")
  started = nnx.to_pure_dict(nnx.state(recipe.initial_model(c)))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), started, exported)
  assert all(jax.tree.leaves(same))
  differs = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), fresh, exported)
  assert not all(jax.tree.leaves(differs))
  c.model.hidden_size = 64
  with pytest.raises(ValueError, match="differs from the run's"):
    recipe.initial_model(c)


def test_a_config_with_interpolate_exports_the_line_from_a_checkpoint_to_the_last_step(
    tiny_run, tmp_path):
  import shutil
  import jax
  import numpy as np
  from flax import nnx
  from ml_collections import ConfigDict
  from msa_jax.interop import hf
  from msa_jax.nn.model import from_params
  from msa_jax.train import loop, recipe
  sys.path.insert(0, str(ROOT))
  from experiments.configs import tiny
  workdir = tmp_path / "run"  # the finished run, re-exported: no step is trained again
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("model"))
  c = tiny.get_config()
  c.interpolate = ConfigDict(dict(from_step=4, keep=0.25))
  recipe.run(c, str(workdir), log=lambda s: None)
  def params_of(model_dir):  # the trained parameters (not the config's constants)
    cfg, params = hf.load_checkpoint(model_dir)
    return nnx.to_pure_dict(nnx.split(from_params(cfg, params), nnx.Param, ...)[1])
  last = params_of(tiny_run / "model")
  ckpts = loop.Checkpoints(str(workdir / "checkpoints"), 2)
  template = nnx.split(recipe.initial_model(c), nnx.Param, ...)[1]
  start = nnx.to_pure_dict(ckpts.restore_params(4, template))
  ckpts.close()
  got = params_of(workdir / "model")
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, start, last)))
  want = jax.tree.map(lambda a, b: np.float64(a) + 0.25 * (np.float64(b) - np.float64(a)),
                      start, last)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.float64(g), w, rtol=0, atol=1e-6)
  assert json.loads((workdir / "model" / "training.json").read_text())["interpolate"] == {
      "from_step": 4, "keep": 0.25}
  c.interpolate.from_step = 3  # not a kept checkpoint
  with pytest.raises(ValueError, match="no checkpoint at step 3"):
    recipe.run(c, str(workdir), log=lambda s: None)


def test_a_run_killed_with_sigkill_resumes_to_the_same_parameters(tiny_run, tmp_path):
  import os
  import signal
  import time
  whole, killed = tiny_run, tmp_path / "killed"
  proc = subprocess.Popen(TRAIN + [f"--workdir={killed}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not _finished_steps(killed) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "model").exists(), "the run finished before it could be killed"
  assert _finished_steps(killed)[-1] < 6
  out = subprocess.run(TRAIN + [f"--workdir={killed}"], check=True, capture_output=True,
                       text=True, timeout=600)
  assert "resumed from step" in out.stdout
  assert ((killed / "model" / "model.safetensors").read_bytes()
          == (whole / "model" / "model.safetensors").read_bytes())


def test_niah_scaling_binary_writes_results_and_plot_and_resumes(tmp_path):
  cmd = [sys.executable, str(ROOT / "experiments" / "niah.py"), "--sizes=1K,2K", "--per_task=1",
         "--tasks=niah_single_1,niah_multikey_2", "--dense_max=1K", "--dense_per_task=1",
         "--rag_k=1", "--disk_from=2K", f"--workdir={tmp_path}"]
  subprocess.run(cmd, check=True, capture_output=True, timeout=600)
  out = json.loads((tmp_path / "niah.json").read_text())
  assert [s["label"] for s in out["sizes"]] == ["1K", "2K"]
  small, large = out["sizes"]
  for s in out["sizes"]:
    for task in ("niah_single_1", "niah_multikey_2", "all"):
      m = s["msa"][task]
      assert 0 <= m["accuracy"] <= 1 and 0 <= m["recall"] <= 1 and m["latency_s"] > 0
      lo, hi = m["accuracy_ci95"]
      assert lo <= m["accuracy"] <= hi
    assert s["rag"]["rag@1"]["all"]["docs"] == 1
  assert small["dense"]["all"]["n"] == 2 and large["dense"] is None
  assert small["bank_bytes"] == 0 and large["bank_bytes"] > 0  # 2K is encoded to disk
  assert (tmp_path / "banks" / "2K-0" / "manifest.json").exists()
  assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
  assert again.stdout.count("done earlier") == 2


def test_niah_binary_takes_a_haystack_of_the_users_text_and_the_harder_setting(tmp_path):
  base = [sys.executable, str(ROOT / "experiments" / "niah.py"), "--sizes=3K", "--per_task=1",
          "--dense_max=0", "--rag_k=1", "--tasks=niah_single_2,niah_multikey_2"]
  subprocess.run(base + [f"--haystack_dir={ROOT / 'tests' / 'data' / 'prose'}",
                         f"--workdir={tmp_path / 'real'}"], check=True, capture_output=True,
                 timeout=600)
  real = json.loads((tmp_path / "real" / "niah.json").read_text())
  assert real["distractors"] == "none" and real["haystack_dir"].endswith("prose")
  assert real["sizes"][0]["haystacks"] == ["essay: 1 questions",
                                           "needles (words/numbers): 1 questions"]
  subprocess.run(base + ["--distractors=filler_needles", f"--workdir={tmp_path / 'hard'}"],
                 check=True, capture_output=True, timeout=600)
  hard = json.loads((tmp_path / "hard" / "niah.json").read_text())
  assert hard["distractors"] == "filler_needles"
  assert hard["sizes"][0]["haystacks"] == ["filler examples: 2 questions"]


def test_multihop_binary_compares_every_method(tmp_path):
  subprocess.run([sys.executable, str(ROOT / "experiments" / "multihop.py"), "--sizes=2K",
                  "--tasks=bridge", "--per_task=2", "--rag_k=1", "--max_rounds=2",
                  f"--workdir={tmp_path}"], check=True, capture_output=True, timeout=600)
  out = json.loads((tmp_path / "multihop.json").read_text())
  (size,) = out["sizes"]
  methods = size["methods"]
  assert set(methods) == {"msa_interleave", "msa_single", "rag@1", "iterative_rag", "oracle",
                          "no_context"}
  assert methods["oracle"]["all"]["hop_recall"] == [1.0, 1.0]
  assert methods["no_context"]["all"]["docs"] == 0
  assert methods["rag@1"]["all"]["docs"] == 1 and methods["iterative_rag"]["all"]["docs"] == 2
  assert methods["msa_single"]["all"]["docs"] <= 1  # the router names one document per round


def test_route_ranks_binary_ranks_every_round_of_a_task(tmp_path):
  out = tmp_path / "ranks.json"
  subprocess.run([sys.executable, str(ROOT / "experiments" / "route_ranks.py"), "--tasks=chain_2",
                  "--batches=1", f"--output={out}"], check=True, capture_output=True, timeout=600)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["task"], r["round"], r["rows"]) for r in rows] == [("chain_2", 1, 12), ("chain_2", 2, 12)]
  # The shipped multi-hop model ranks both hops' documents first (measured: 36 / 36 rows each).
  assert all(r["top1"] >= 0.75 and r["top8"] == 1.0 for r in rows), rows
