"""Bad input, given as a careless or hostile user would: every case through `msa-jax`, checked.

  python experiments/reliability.py                      # ~2 min on a 2-core CPU
  python experiments/reliability.py --stress_s=30 --output=out/reliability.json

Runs each case of the bank and command-line reliability checklist against the official tiny
checkpoint in tests/data (and checkpoints and banks derived from it), and prints one row per
case: what was tried, the exit status expected and got (0 success, 2 refused with a message,
1 an uncaught exception: a bug), a check of what must not have changed, and the first line of
the message. Commands run in this process through `msa_jax.cli.main`, exactly as the console
script runs them (an exception that escapes counts as status 1). The reader-during-compaction
case opens the bank in this process while a second process compacts it for --stress_s seconds.
Exits 1 if any case differs from what is expected.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from msa_jax import cli  # noqa: E402
from msa_jax.memory import store  # noqa: E402

_STRESS_S = flags.DEFINE_float("stress_s", 10.0, "Seconds of concurrent compaction.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the table as JSON here.")

OFFICIAL = ROOT / "tests" / "data" / "official_msa_tiny"
CKPT = OFFICIAL / "ckpt"
VOCAB = 320


def run_cli(argv: list[str]) -> tuple[int, str]:
  """(exit status, stderr) of `msa-jax argv`, as the console script would exit."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
      rc = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - an escaping exception is what we are probing for
      rc, _ = 1, err.write(f"uncaught {type(e).__name__}: {e}")
  return rc, err.getvalue()


def first_line(text: str) -> str:
  """The error line of a refusal (argparse's comes after its usage lines)."""
  lines = [l for l in text.splitlines() if "error:" in l]
  return (lines[0] if lines else "")[:150]


def random_docs(path: pathlib.Path, seed: int, m: int, **extra) -> dict:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 12, m)
  tokens = np.full((m, 12), -1)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(0, VOCAB, n)
  arrays = dict(tokens=tokens, lengths=lengths, **extra)
  np.savez(path, **arrays)
  return arrays


def reseal(bank: pathlib.Path, **changes) -> None:
  """Rewrites a manifest with changed values and a valid checksum (a buggy writer's commit)."""
  m = json.loads((bank / "manifest.json").read_text())
  m.update(changes)
  m["checksum"] = store._manifest_digest(m)
  (bank / "manifest.json").write_text(json.dumps(m))


def files_of(bank: pathlib.Path) -> dict:
  return {str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*.npy"))}


class Probe:
  def __init__(self, work: pathlib.Path):
    self.work, self.rows = work, []
    self.a = random_docs(work / "a.npz", 1, 6)
    self.b = random_docs(work / "b.npz", 2, 6)
    np.savez(work / "a8.npz", tokens=np.concatenate([self.a["tokens"], self.b["tokens"][:2]]),
             lengths=np.concatenate([self.a["lengths"], self.b["lengths"][:2]]))
    ref = np.load(OFFICIAL / "fixture_inference.npz")
    self.request = {k: ref["stage2_" + k] for k in ("input_ids", "doc_ids", "attention_mask",
                                                    "position_ids")}
    np.savez(work / "req.npz", **self.request)
    self.batch = dict(np.load(OFFICIAL / "fixture.npz"))

  def case(self, defect: str, what: str, argv: Callable[[], list], expect: int,
           check: Callable[[str], bool] | None = None, check_what: str = "") -> None:
    """check(message): what must hold after the command, besides its exit status."""
    t0 = time.perf_counter()
    rc, err = run_cli(argv())
    ok_check = check(first_line(err)) if check else True
    self.rows.append(dict(defect=defect, case=what, expect=expect, status=rc,
                          check=(check_what + (" ok" if ok_check else " FAILED"))
                          if check else "", message=first_line(err),
                          seconds=round(time.perf_counter() - t0, 2),
                          ok=rc == expect and ok_check))

  def bank(self, name: str, docs: str = "a.npz", *extra) -> pathlib.Path:
    path = self.work / name
    rc, err = run_cli(["encode", "--checkpoint", CKPT, "--documents", self.work / docs,
                       "--bank", path, "--shard-docs", 4, *extra])
    assert rc == 0, err
    return path

  def generate(self, bank, req="req.npz", *extra) -> list:
    return ["generate", "--checkpoint", CKPT, "--bank", bank, "--batch", self.work / req,
            "--max-new-tokens", 2, "--output", self.work / "gen.npz", *extra]

  def forward(self, batch, *extra, ckpt=CKPT) -> list:
    return ["forward", "--checkpoint", ckpt, "--batch", batch, "--output",
            self.work / "fwd.npz", *extra]

  def npz(self, name: str, arrays: dict) -> pathlib.Path:
    np.savez(self.work / name, **arrays)
    return self.work / name

  def encode(self, bank, docs, *extra, ckpt=CKPT) -> list:
    return ["encode", "--checkpoint", ckpt, "--documents", docs, "--bank", bank, *extra]

  # --- the checklist ---

  def d1_resume_trusts_a_count(self):
    bank = self.bank("d1")
    before = files_of(bank)
    same = lambda _: files_of(bank) == before
    self.case("1", "encode again with 6 other documents", lambda: self.encode(
        bank, self.work / "b.npz"), 2, same, "bank unchanged")
    self.case("1", "encode again with the 6 documents plus 2", lambda: self.encode(
        bank, self.work / "a8.npz"), 2, same, "bank unchanged")
    store.delete_documents(bank, [1, 4])
    store.compact(bank)
    self.case("1", "delete ids 1, 4, compact, re-run the original encode", lambda: self.encode(
        bank, self.work / "a.npz"), 0,
        lambda _: store.open_bank(bank).doc_ids.tolist() == [0, 2, 3, 5], "deleted stay deleted")
    self.case("1", "the 6 other documents with --append", lambda: self.encode(
        bank, self.work / "b.npz", "--append"), 0,
        lambda _: store.open_bank(bank).doc_ids.tolist() == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11],
        "ids 6..11 added")

  def d2_lowered_next_shard(self):
    bank = self.bank("d2")  # shards s000000, s000001
    reseal(bank, next_shard=1)
    before = files_of(bank)
    self.case("2", "manifest next_shard lowered to 1, then an append", lambda: self.encode(
        bank, self.work / "b.npz", "--append"), 2, lambda _: files_of(bank) == before,
        "committed shards intact")
    self.case("2", "... and generate on it", lambda: self.generate(bank), 2)

  def d3_token_ids(self):
    tpl = self.work / "tpl.npz"
    np.savez(tpl, **dict(self.a, template=np.array([5, VOCAB, 7])))
    self.case("3", f"template token {VOCAB} (= vocab)", lambda: self.encode(
        self.work / "d3_tpl", tpl), 2, lambda _: not (self.work / "d3_tpl").exists(),
        "no bank left")
    bank = self.bank("d3")
    for name, value in (("5000", 5000), ("-5", -5)):
      req = dict(self.request)
      req["input_ids"] = req["input_ids"].copy()
      req["input_ids"][1, 3] = value
      self.npz(f"req_{name}.npz", req)
      self.case("3", f"generate with input id {value}",
                lambda n=name: self.generate(bank, f"req_{n}.npz"), 2)
    req = dict(self.request)
    req["position_ids"] = req["position_ids"] - 100
    self.npz("req_negpos.npz", req)
    self.case("3", "generate with negative positions",
              lambda: self.generate(bank, "req_negpos.npz"), 2)
    batch = dict(self.batch)
    batch["input_ids"] = batch["input_ids"].copy()
    batch["input_ids"][0, 2] = VOCAB + 10
    self.case("3", "forward with an input id >= vocab",
              lambda: self.forward(self.npz("fwd_id.npz", batch)), 2)
    batch = dict(self.batch)
    batch["position_ids"] = batch["position_ids"] - 100
    self.case("3", "forward with negative positions",
              lambda: self.forward(self.npz("fwd_pos.npz", batch)), 2)

  def d4_readers_during_compaction(self):
    bank = self.bank("d4")
    store.compact(bank, max_shard_docs=2)
    want = store.open_bank(bank).doc_ids.tolist()
    code = ("import sys, time; from msa_jax.memory import store\n"
            "end, i = time.time() + float(sys.argv[2]), 0\n"
            "while time.time() < end:\n"
            "  store.compact(sys.argv[1], max_shard_docs=2 + i % 2); i += 1\n"
            "print(i)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(bank), str(_STRESS_S.value)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    opens, failures, first = 0, 0, ""
    t0 = time.perf_counter()
    while proc.poll() is None:
      for verify in (True, False):
        try:
          if store.open_bank(bank, verify=verify).doc_ids.tolist() != want:
            raise AssertionError("a reader saw other documents")
        except Exception as e:  # noqa: BLE001 - counted and reported
          failures += 1
          first = first or f"{type(e).__name__}: {e}"
        opens += 1
    compactions = int(proc.stdout.read() or 0)
    self.rows.append(dict(defect="4", case=f"{opens} opens while {compactions} compactions ran",
                          expect=0, status=int(failures > 0),
                          check=f"{failures} failed opens", message=first[:150],
                          seconds=round(time.perf_counter() - t0, 2), ok=failures == 0))

  def d5_empty_banks(self):
    empty = self.npz("empty.npz", dict(tokens=np.zeros((0, 4), np.int64),
                                       lengths=np.zeros(0, np.int64)))
    self.case("5", "encode an empty input", lambda: self.encode(self.work / "d5_empty", empty),
              2, lambda _: not (self.work / "d5_empty").exists(), "no bank left")
    bank = self.bank("d5")
    store.delete_documents(bank, list(range(6)))
    self.case("5", "generate on an all-deleted bank", lambda: self.generate(bank), 2)
    store.compact(bank)
    self.case("5", "generate on that bank compacted (0 documents)", lambda: self.generate(bank),
              2)

  def d6_arguments(self):
    bank = self.bank("d6")
    for n in (0, -3):
      self.case("6", f"--max-new-tokens {n}", lambda n=n: self.generate(bank)[:-4] + [
          "--max-new-tokens", n, "--output", self.work / "gen.npz"], 2)
    zero = self.work / "zero.npz"
    zero.write_bytes(b"")
    self.case("6", "a 0-byte .npz as --batch", lambda: self.generate(bank, "zero.npz"), 2)
    self.case("6", "a 0-byte .npz as --documents", lambda: self.encode(self.work / "d6z", zero),
              2)
    (self.work / "afile").write_text("x")
    self.case("6", "an unwritable --output (its parent is a file)", lambda: self.generate(
        bank)[:-2] + ["--output", self.work / "afile" / "o.npz"], 2)
    self.case("6", "a missing --reference", lambda: self.forward(
        OFFICIAL / "fixture.npz", "--reference", self.work / "nope.npz"), 2)
    ckpt = self.work / "ckpt_badcfg"
    shutil.copytree(CKPT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["msa_config"]["top_k_docs"] = "two"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    self.case("6", 'config.json top_k_docs "two" (forward)', lambda: self.forward(
        OFFICIAL / "fixture.npz", ckpt=ckpt), 2)
    self.case("6", 'config.json top_k_docs "two" (encode)', lambda: self.encode(
        self.work / "d6c", self.work / "a.npz", ckpt=ckpt), 2)
    jsonl = self.work / "d.jsonl"
    jsonl.write_text('{"text": "a b"}\n')
    (self.work / "bad_tok.json").write_text("{not json")
    self.case("6", "a missing --tokenizer file", lambda: self.encode(
        self.work / "d6t", jsonl, "--tokenizer", self.work / "nope.json"), 2)
    self.case("6", "a malformed --tokenizer file", lambda: self.encode(
        self.work / "d6t", jsonl, "--tokenizer", self.work / "bad_tok.json"), 2)
    self.case("6", "--shard-docs 0", lambda: self.encode(
        self.work / "d6s", self.work / "a.npz", "--shard-docs", 0), 2)
    self.case("6", "--temperature nan", lambda: self.generate(bank, "req.npz", "--temperature",
                                                               "nan"), 2)
    self.case("6", "--top-p 0", lambda: self.generate(bank, "req.npz", "--top-p", 0), 2)

  def d7_checkpoint_integrity(self):
    from msa_jax.interop import hf
    cfg, params = hf.load_checkpoint(CKPT)
    ours = self.work / "ckpt_ours"
    hf.save_checkpoint(ours, cfg, params)
    raw = bytearray((ours / "model.safetensors").read_bytes())
    raw[-9] ^= 0x10  # a byte of the last tensor's data
    (ours / "model.safetensors").write_bytes(bytes(raw))
    self.case("7", "a flipped weight byte in a checkpoint we saved", lambda: self.forward(
        OFFICIAL / "fixture.npz", ckpt=ours), 2)
    from safetensors.numpy import load_file, save_file
    nan = self.work / "ckpt_nan"
    shutil.copytree(CKPT, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, nan / "model.safetensors")
    self.case("7", "a NaN weight in an official-format checkpoint", lambda: self.forward(
        OFFICIAL / "fixture.npz", ckpt=nan), 2)

  def mixing(self):
    from msa_jax.interop import hf
    bank = self.bank("mix")
    cfg, params = hf.load_checkpoint(CKPT)
    params["embed"]["embedding"] = np.asarray(params["embed"]["embedding"]) * 1.001
    other = self.work / "ckpt_other_weights"
    hf.save_checkpoint(other, cfg, params)
    self.case("mix", "generate with same-config, other-weights checkpoint", lambda: [
        "generate", "--checkpoint", other, "--bank", bank, "--batch", self.work / "req.npz",
        "--max-new-tokens", 2, "--output", self.work / "gen.npz"], 2,
        lambda msg: "encoded by other weights" in msg, "named as other weights")

  def d8_manifest_faults(self):
    bank = self.bank("d8a")
    text = (bank / "manifest.json").read_text()
    digest = json.loads(text)["shards"][0]["files"]["keys_L2.npy"]["sha256"]
    flip = digest[:5] + ("0" if digest[5] != "0" else "1") + digest[6:]
    (bank / "manifest.json").write_text(text.replace(digest, flip))
    self.case("8", "a flipped sha256 digit in the manifest", lambda: self.generate(bank), 2,
              lambda msg: "manifest's checksum" in msg and "corrupt" not in msg,
              "named as the manifest")
    bank = self.bank("d8b")
    reseal(bank, next_doc_id=3)
    self.case("8", "next_doc_id lowered to 3, then an append", lambda: self.encode(
        bank, self.work / "b.npz", "--append"), 2, lambda msg: "next_doc_id=3" in msg,
        "named as next_doc_id")

  def d9_compaction(self):
    bank = self.bank("d9", "a8.npz")
    store.compact(bank, max_shard_docs=3)
    before = (bank / "manifest.json").read_bytes()
    removed = store.compact(bank, max_shard_docs=3)
    same = (bank / "manifest.json").read_bytes() == before
    self.rows.append(dict(defect="9", case="compact(max_shard_docs=3) on a compacted bank",
                          expect=0, status=0, check=f"removed {removed}, manifest "
                          f"{'unchanged' if same else 'REWRITTEN'}", message="", seconds=0.0,
                          ok=same and removed == 0))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    probe = Probe(pathlib.Path(tmp))
    for step in (probe.d1_resume_trusts_a_count, probe.d2_lowered_next_shard, probe.d3_token_ids,
                 probe.d4_readers_during_compaction, probe.d5_empty_banks, probe.d6_arguments,
                 probe.d7_checkpoint_integrity, probe.mixing, probe.d8_manifest_faults,
                 probe.d9_compaction):
      step()
  rows = probe.rows
  print(f"{'#':<2} {'case':<56} {'want':>4} {'got':>4}  {'check':<28} message")
  for r in rows:
    print(f"{r['defect']:<2} {r['case'][:56]:<56} {r['expect']:>4} {r['status']:>4}  "
          f"{r['check'][:28]:<28} {r['message'][:100]}")
  bad = [r for r in rows if not r["ok"]]
  print(f"{len(rows) - len(bad)} of {len(rows)} cases as expected")
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(rows, f, indent=1)
  return 1 if bad else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
