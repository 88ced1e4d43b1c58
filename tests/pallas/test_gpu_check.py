"""pallas_kernels/gpu_check.py at tiny size on CPU (kernels interpreted): every section runs,
the JSON has the numbers, and a failing section is recorded without losing the others."""

import json

import pytest

from pallas_kernels import gpu_check

ARGS = ["--small", "--interpret", "--shapes", "tiny", "--repeats", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check") / "check.json"
  data = gpu_check.main(ARGS + ["--out", str(out)])
  return data, json.loads(out.read_text())


def test_all_sections_pass(report):
  data, on_disk = report
  assert on_disk["errors"] == {} and on_disk["ok"] is True
  assert on_disk["env"]["interpret"] is True
  assert set(on_disk["section_seconds"]) == {"env", "bandwidth", "routing", "doc_topk", "gather"}
  assert data["ok"] is True


def test_numbers_are_there(report):
  _, d = report
  assert d["bandwidth"]["copy_GBps"] > 0 and d["bandwidth"]["read_GBps"] > 0
  row = d["routing"]["tiny"]["q1"]
  assert row["parity_ok"] is True, row
  for key in ("xla_ms", "pallas_ms", "xla_frac_copy_bw", "pallas_frac_read_bw",
              "xla_first_call_s"):
    assert row[key] > 0, key
  assert d["doc_topk"]["equal"] is True
  assert d["gather"]["tiny"]["equal"] is True


def test_a_failing_section_is_recorded(tmp_path, monkeypatch):
  def broken(args):
    raise RuntimeError("no device")

  monkeypatch.setattr(gpu_check, "_gather", broken)
  out = tmp_path / "check.json"
  gpu_check.main(ARGS + ["--out", str(out), "--sections", "env", "gather", "bandwidth"])
  d = json.loads(out.read_text())
  assert d["ok"] is False
  assert d["errors"] == {"gather": "RuntimeError: no device"}
  assert "traceback" in d["gather"]
  assert d["bandwidth"]["read_GBps"] > 0  # the section after the failure still ran
