"""The README's library example runs as written."""

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent


def test_readme_model_example_runs(monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  example = next(b for b in blocks if "hf.load_checkpoint" in b)
  monkeypatch.chdir(ROOT)
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)
  assert scope["out"].selected[2].tolist() == [[3, 5], [1, 5]]
  assert os.path.exists(ROOT / "out" / "exported" / "model.safetensors")


def test_readme_math_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  example = next(b for b in blocks if "msa.chunk_mean" in b)
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)
  assert scope["counts"].tolist() == [[4, 4, 2], [4, 1, 0], [1, 0, 0]]
  assert scope["docs"].shape == (1, 4) and scope["ids"].shape == (1, 2)
  assert set(scope["ids"][0].tolist()) <= {1, 2, 3}


def test_readme_training_data_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  example = next(b for b in blocks if "batches.build" in b)
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)
  ex, batch = scope["ex"], scope["batch"]
  assert ex.answer_text in ex.docs[ex.gold[0]]
  assert batch.doc_tokens.shape[:2] == (1, 8) and batch.input_ids.shape[0] == 2
  assert ex.answer_text in capsys.readouterr().out


def test_readme_text_memory_example_runs(monkeypatch, tmp_path, capsys):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  example = next(b for b in blocks if "TextMemory" in b)
  monkeypatch.chdir(ROOT)
  example = example.replace('"out/notes_bank"', repr(str(tmp_path / "bank")))
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)
  assert scope["ans"].answer == "4172093"
  assert scope["ans"].rounds[0].documents[0].id == scope["ids"][0]
  assert capsys.readouterr().out.splitlines()[-1] == "171"  # the note deleted, the prose kept
