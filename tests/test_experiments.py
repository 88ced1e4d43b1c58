"""Experiment binaries run end to end on their defaults."""

import json
import pathlib
import subprocess
import sys

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
