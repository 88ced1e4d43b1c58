"""The bank on disk (msa_jax.memory.store): format round trip, crash safety, errors, dynamic memory.

Documents are random numpy EncodedDocs (no model needed). Run as a script
(`python tests/test_memory_store.py writer <bank> <dtype>`) it is the writer process that the
SIGKILL test kills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from msa_jax.memory import store
from msa_jax.memory.bank import BankSpec, EncodedDocs, MemoryBank, Template
from msa_jax.memory.store import BankError, BankWriter, ChunkArray, ContentReader, open_bank

ROOT = pathlib.Path(__file__).resolve().parents[1]
P = 4
SPEC = BankSpec(config_fingerprint="0123456789abcdef", router_layers=(1, 3), num_layers=4,
                num_kv_heads=2, head_dim=8, pooling_size=P)
KINDS = ("keys", "values", "routing_keys")


def spec_for(dtype: str) -> BankSpec:
  return dataclasses.replace(SPEC, dtype=dtype)


def make_docs(seed: int, lengths, spec: BankSpec) -> EncodedDocs:
  """Random stage-1 output in the spec's dtype (so the bank stores it exactly)."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int64)
  c = int((-(-lengths // spec.pooling_size)).sum())
  dt = store._DTYPES[spec.dtype][0]
  arr = lambda: {l: rng.standard_normal((c, spec.num_kv_heads, spec.head_dim)).astype(dt)
                 for l in spec.router_layers}
  return EncodedDocs(lengths=lengths, keys=arr(), values=arr(), routing_keys=arr())


def make_template(spec: BankSpec, t: int = 3) -> Template:
  rng = np.random.default_rng(99)
  dt = store._DTYPES[spec.dtype][0]
  arr = lambda: {l: rng.standard_normal((t, spec.num_kv_heads, spec.head_dim)).astype(dt)
                 for l in range(spec.num_layers)}
  return Template(tokens=np.arange(10, 10 + t), keys=arr(), values=arr())


def concat(docs: list[EncodedDocs]) -> EncodedDocs:
  cat = lambda kind: {l: np.concatenate([getattr(d, kind)[l] for d in docs])
                      for l in getattr(docs[0], kind)}
  return EncodedDocs(lengths=np.concatenate([d.lengths for d in docs]), keys=cat("keys"),
                     values=cat("values"), routing_keys=cat("routing_keys"))


def doc_slice(enc: EncodedDocs, rows, spec: BankSpec) -> EncodedDocs:
  """The documents at `rows` of `enc` (in that order)."""
  bank = MemoryBank.from_encoded(spec, enc)
  chunks = ContentReader(bank).doc_chunks(rows)
  return EncodedDocs(lengths=enc.lengths[rows],
                     **{k: {l: a[chunks] for l, a in getattr(enc, k).items()} for k in KINDS})


def live_view(bank: MemoryBank) -> dict:
  """The live documents of a bank in row order: ids, lengths and their chunks' raw bytes."""
  rows = np.flatnonzero(bank.live)
  chunks = ContentReader(bank).doc_chunks(rows)
  out = {"ids": bank.doc_ids[rows].tolist(), "lengths": bank.lengths[rows].tolist()}
  for kind in KINDS:
    for l, a in getattr(bank, kind).items():
      x = np.asarray(a[chunks])
      out[f"{kind}{l}"] = (str(x.dtype), x.shape, x.tobytes())
  return out


def assert_banks_equal(got: MemoryBank, want: MemoryBank) -> None:
  assert got.spec == want.spec
  for f in ("doc_ids", "lengths", "chunk_offset", "chunk_count", "live"):
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
  for kind in KINDS:
    assert sorted(getattr(got, kind)) == sorted(getattr(want, kind))
    for l, a in getattr(want, kind).items():
      g = np.asarray(getattr(got, kind)[l])
      assert g.dtype == a.dtype and g.shape == a.shape, (kind, l)
      assert g.tobytes() == np.asarray(a).tobytes(), (kind, l)
  assert (got.template is None) == (want.template is None)
  if want.template is not None:
    np.testing.assert_array_equal(got.template.tokens, want.template.tokens)
    for kind in ("keys", "values"):
      for l, a in getattr(want.template, kind).items():
        g = getattr(got.template, kind)[l]
        assert g.dtype == a.dtype and g.tobytes() == a.tobytes(), (kind, l)


def shard_files(path) -> list[dict]:
  return [s["files"] for s in json.loads((pathlib.Path(path) / "manifest.json").read_text())
          ["shards"]]


# Batches a corpus is encoded in; the SIGKILL writer and its reference use the same ones.
BATCH_LENGTHS = [[5, 1, 8], [3], [9, 4], [2, 2, 7], [1], [6, 3]]


def batches(spec: BankSpec) -> list[EncodedDocs]:
  return [make_docs(100 + i, ls, spec) for i, ls in enumerate(BATCH_LENGTHS)]


def build(path, spec: BankSpec, docs: list[EncodedDocs], template=None, ids=None) -> None:
  with BankWriter(path, spec, template=template) as w:
    for i, d in enumerate(docs):
      w.append(d, None if ids is None else ids[i])


@pytest.fixture
def f32_bank(tmp_path):
  path = tmp_path / "bank"
  build(path, SPEC, batches(SPEC)[:2])
  return path


# --- format round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, dtype):
  spec, template = spec_for(dtype), make_template(spec_for(dtype))
  docs = batches(spec)[:3]
  build(tmp_path / "bank", spec, docs, template=template)
  want = MemoryBank.from_encoded(spec, concat(docs), template=template)
  for mmap in (True, False):
    got = open_bank(tmp_path / "bank", spec=spec, mmap=mmap)
    assert_banks_equal(got, want)
    if mmap:  # content stays on disk, per shard; routing keys are one in-memory array
      assert isinstance(got.keys[1], ChunkArray) and len(got.keys[1].parts) == 3
      assert all(isinstance(p, np.memmap) for p in got.keys[1].parts)
      assert type(got.routing_keys[3]) is np.ndarray
  # The files are plain .npy that load without pickle; bf16 is stored as its uint16 bits.
  f = tmp_path / "bank" / "shards" / "s000000" / "keys_L3.npy"
  raw = np.load(f, mmap_mode="r", allow_pickle=False)
  assert raw.dtype == (np.uint16 if dtype == "bfloat16" else np.float32)
  assert raw.view(store._DTYPES[dtype][0]).tobytes() == docs[0].keys[3].tobytes()
  m, stored = store.read_manifest(tmp_path / "bank")
  assert stored == spec and m["version"] == 1 and m["num_docs"] == 6 and m["next_doc_id"] == 6


def test_chunk_array_and_content_reader(tmp_path):
  build(tmp_path / "bank", SPEC, batches(SPEC)[:3])  # shards of 5, 1 and 4 chunks
  bank = open_bank(tmp_path / "bank")
  ref = MemoryBank.from_encoded(SPEC, concat(batches(SPEC)[:3]))
  k, full = bank.keys[1], ref.keys[1]
  assert isinstance(k, ChunkArray) and k.shape == full.shape and k.dtype == full.dtype
  for idx in (0, -1, 4, slice(None), slice(1, 6), slice(None, None, -2), [5, 0, 9, 3, 7],
              np.array([[1, 4], [5, 8]]), full[:, 0, 0] > 0, (slice(2, 5), 1), (3, 0, 2),
              ([4, 1], slice(None), 3)):
    np.testing.assert_array_equal(k[idx], full[idx], err_msg=str(idx))
  np.testing.assert_array_equal(np.asarray(k), full)
  with pytest.raises(IndexError):
    k[[len(full)]]
  reader = ContentReader(bank)
  rows = np.array([[5, 1], [9, 6]])
  gk, gv = reader.gather(3, rows)
  np.testing.assert_array_equal(gk, ref.keys[3][rows])
  np.testing.assert_array_equal(gv, ref.values[3][rows])
  assert reader.bytes_read == gk.nbytes + gv.nbytes
  dk, _ = reader.gather_docs(1, [3, 0])  # doc 3 (len 3: chunk 5) then doc 0 (len 5: 0, 1)
  np.testing.assert_array_equal(dk, full[[5, 0, 1]])


def test_save_bank_writes_live_documents(tmp_path):
  spec = spec_for("bfloat16")
  mem = MemoryBank.from_encoded(spec, concat(batches(spec)[:2]), np.array([7, 3, 9, 4]),
                                template=make_template(spec))
  mem.live[1] = False
  assert store.save_bank(tmp_path / "bank", mem).tolist() == [7, 9, 4]
  got = open_bank(tmp_path / "bank")
  assert got.live.all() and live_view(got) == live_view(mem)
  assert_banks_equal(got, open_bank(tmp_path / "bank", mmap=False))
  assert got.template.tokens.tolist() == mem.template.tokens.tolist()


# --- crash safety -------------------------------------------------------------------------------


def test_uncommitted_leftovers_are_ignored_then_cleaned(tmp_path):
  path, docs = tmp_path / "bank", batches(SPEC)
  build(path, SPEC, docs[:2])
  # What a writer killed mid-append leaves: a half-written temp shard, a shard renamed into
  # place but never listed, and a half-written manifest temp file.
  tmp = path / ".tmp-shard-s000002-123-abcd"
  tmp.mkdir()
  (tmp / "keys_L1.npy").write_bytes(b"\x93NUMPY partial")
  orphan = path / "shards" / "s000002"
  orphan.mkdir()
  (orphan / "doc_ids.npy").write_bytes(b"junk")
  good = (path / "manifest.json").read_text()
  (path / "manifest.json.tmp-123-abcd").write_text(good[: len(good) // 2])
  assert_banks_equal(open_bank(path), MemoryBank.from_encoded(SPEC, concat(docs[:2])))
  with BankWriter(path, SPEC) as w:  # resume: cleans up, continues where it stopped
    assert w.num_committed_docs == 4
    assert not tmp.exists() and not orphan.exists()
    assert not (path / "manifest.json.tmp-123-abcd").exists()
    for d in docs[2:]:
      w.append(d)
  build(tmp_path / "ref", SPEC, docs)
  assert shard_files(path) == shard_files(tmp_path / "ref")
  assert_banks_equal(open_bank(path), open_bank(tmp_path / "ref"))


@pytest.mark.parametrize("point", ["_publish_dir", "_publish_manifest"])
def test_failure_before_publish_keeps_previous_bank(tmp_path, monkeypatch, point):
  path, docs = tmp_path / "bank", batches(SPEC)
  build(path, SPEC, docs[:2])
  before = open_bank(path)

  def crash(*args):
    raise KeyboardInterrupt("killed")

  w = BankWriter(path)
  monkeypatch.setattr(store, point, crash)
  with pytest.raises(KeyboardInterrupt):
    w.append(docs[2])
  monkeypatch.undo()
  assert_banks_equal(open_bank(path), before)
  assert w.num_committed_docs == 4  # the writer's own view did not move either
  w.append(docs[2])
  w.close()
  assert_banks_equal(open_bank(path), MemoryBank.from_encoded(SPEC, concat(docs[:3])))


def _writer_main(path: str, dtype: str, pause: float = 0.3) -> None:
  """The process the SIGKILL test kills: appends the batches one shard at a time, resuming."""
  spec = spec_for(dtype)
  with BankWriter(path, spec, template=make_template(spec)) as w:
    done = np.cumsum([0] + [len(ls) for ls in BATCH_LENGTHS]).tolist().index(
        w.num_committed_docs)
    for i, d in enumerate(batches(spec)[done:], start=done):
      w.append(d)
      print(f"committed {i}", flush=True)
      time.sleep(pause)


def test_sigkill_mid_build_then_resume(tmp_path):
  path, spec = tmp_path / "bank", spec_for("bfloat16")
  proc = subprocess.Popen([sys.executable, __file__, "writer", str(path), "bfloat16"],
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
  try:
    for _ in range(2):
      line = proc.stdout.readline()
      assert line.startswith("committed"), line
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed = open_bank(path)
  assert 2 <= store.read_manifest(path)[0]["next_shard"] < len(BATCH_LENGTHS)
  n = killed.num_docs
  assert n in np.cumsum([len(ls) for ls in BATCH_LENGTHS])
  _writer_main(str(path), "bfloat16", pause=0)  # resume to completion
  build(tmp_path / "ref", spec, batches(spec), template=make_template(spec))
  assert shard_files(path) == shard_files(tmp_path / "ref")
  assert_banks_equal(open_bank(path), open_bank(tmp_path / "ref"))


# --- errors -------------------------------------------------------------------------------------


def test_corrupt_byte_is_named(f32_bank):
  f = f32_bank / "shards" / "s000001" / "values_L3.npy"
  data = bytearray(f.read_bytes())
  data[-7] ^= 0x01
  f.write_bytes(bytes(data))
  with pytest.raises(BankError, match=r"s000001/values_L3\.npy: checksum mismatch"):
    open_bank(f32_bank)
  open_bank(f32_bank, verify=False)  # sizes and headers are fine: only the checksum tells
  with pytest.raises(BankError, match=r"values_L3\.npy: checksum mismatch"):
    store.compact(f32_bank)  # compaction does not launder corruption into new checksums


def test_truncated_and_missing_files(f32_bank):
  f = f32_bank / "shards" / "s000000" / "routing_keys_L1.npy"
  data = f.read_bytes()
  f.write_bytes(data[:-16])
  for verify in (True, False):
    with pytest.raises(BankError, match=r"routing_keys_L1\.npy: truncated file"):
      open_bank(f32_bank, verify=verify)
  f.unlink()
  with pytest.raises(BankError, match=r"routing_keys_L1\.npy: missing file"):
    open_bank(f32_bank)
  (f32_bank / "manifest.json").unlink()
  with pytest.raises(BankError, match=r"manifest\.json: missing file"):
    open_bank(f32_bank)


@pytest.mark.parametrize("field,value", [("config_fingerprint", "feedfacefeedface"),
                                         ("head_dim", 16), ("dtype", "bfloat16"),
                                         ("router_layers", (1, 2))])
def test_wrong_spec_names_the_field(f32_bank, field, value):
  other = dataclasses.replace(SPEC, **{field: value})
  with pytest.raises(BankError, match=rf"different model or spec: {field}: bank has"):
    open_bank(f32_bank, spec=other)
  with pytest.raises(BankError, match=rf"different model or spec: {field}: bank has"):
    BankWriter(f32_bank, other)
  open_bank(f32_bank, spec=SPEC)


def sealed(manifest: dict) -> str:
  """The manifest as a (buggy) writer would commit it: wrong values, valid own checksum."""
  return json.dumps(dict(manifest, checksum=store._manifest_digest(manifest)))


def test_bad_manifests(f32_bank):
  mpath = f32_bank / "manifest.json"
  good = json.loads(mpath.read_text())
  cases = [
      (dict(good, version=2), r"unsupported bank format version 2"),
      (dict(good, format="something-else"), r"not a memory bank manifest"),
      ({k: v for k, v in good.items() if k != "shards"}, r"malformed manifest \(missing key"),
      (dict(good, num_chunks=good["num_chunks"] + 1), r"malformed manifest \(num_chunks"),
      (dict(good, spec={**good["spec"], "extra": 1}), r"malformed manifest \(spec fields"),
      (dict(good, tombstones=[999]), r"malformed manifest \(tombstones name ids"),
  ]
  for manifest, pattern in cases:
    mpath.write_text(sealed(manifest))
    with pytest.raises(BankError, match=pattern):
      open_bank(f32_bank)
  mpath.write_text(json.dumps(good)[:-20])
  with pytest.raises(BankError, match=r"manifest\.json: malformed manifest \(not valid JSON"):
    open_bank(f32_bank)
  mpath.write_text(json.dumps(good))
  open_bank(f32_bank)


def test_a_damaged_manifest_is_reported_as_the_manifest_not_as_a_shard_file(f32_bank):
  mpath = f32_bank / "manifest.json"
  text = mpath.read_text()
  digest = json.loads(text)["shards"][1]["files"]["values_L3.npy"]["sha256"]
  flipped = digest[:10] + ("0" if digest[10] != "0" else "1") + digest[11:]
  mpath.write_text(text.replace(digest, flipped))
  for attempt in (lambda: open_bank(f32_bank), lambda: BankWriter(f32_bank)):
    with pytest.raises(BankError, match=r"manifest\.json: the manifest's checksum does not "
                                        r"match its contents") as e:
      attempt()
    assert "values_L3" not in str(e.value) and "corrupt" not in str(e.value)


def test_a_lowered_next_doc_id_is_named_as_a_manifest_fault(f32_bank):
  mpath = f32_bank / "manifest.json"
  m = json.loads(mpath.read_text())
  mpath.write_text(sealed(dict(m, next_doc_id=3)))  # ids 0..3 are stored
  pattern = r"malformed manifest \(next_doc_id=3 but id 3 is stored"
  with pytest.raises(BankError, match=pattern):
    open_bank(f32_bank)
  with pytest.raises(BankError, match=pattern):  # not "ids [3] are already live"
    store.add_documents(f32_bank, make_docs(5, [2], SPEC))


def test_a_lowered_next_shard_is_refused_and_no_committed_shard_is_touched(f32_bank):
  mpath = f32_bank / "manifest.json"
  m = json.loads(mpath.read_text())
  mpath.write_text(sealed(dict(m, next_shard=1)))  # s000000 and s000001 are committed
  before = {f: f.read_bytes() for f in (f32_bank / "shards").rglob("*.npy")}
  with pytest.raises(BankError, match=r"next_shard=1 but shard 's000001' is listed"):
    open_bank(f32_bank)
  with pytest.raises(BankError, match=r"next_shard=1 but shard 's000001' is listed"):
    store.add_documents(f32_bank, make_docs(5, [2], SPEC))
  with pytest.raises(BankError, match=r"next_shard=1"):
    store.compact(f32_bank)
  assert {f: f.read_bytes() for f in (f32_bank / "shards").rglob("*.npy")} == before


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m["shards"].reverse(), r"'s000000' repeats or is out of order"),
    (lambda m: m["shards"][1].update(name=m["shards"][0]["name"]), r"repeats or is out of order"),
    (lambda m: m["shards"][0].update(generation=m["generation"] + 1),
     r"shards\[0\]\.generation=\d+ is out of order or above the manifest's generation"),
    (lambda m: m["shards"][1].update(generation=m["shards"][0]["generation"] - 1),
     r"shards\[1\]\.generation=\d+ is out of order"),
    (lambda m: m.update(inputs=[{"sha256": "0" * 64, "num_docs": 2, "first_id": 0,
                                 "committed": 3}]), r"inputs\[0\]\.committed=3 is above its"),
])
def test_manifest_invariants_are_checked_on_open(f32_bank, edit, pattern):
  mpath = f32_bank / "manifest.json"
  m = json.loads(mpath.read_text())
  edit(m)
  mpath.write_text(sealed(m))
  with pytest.raises(BankError, match=pattern):
    open_bank(f32_bank)
  with pytest.raises(BankError, match=pattern):
    BankWriter(f32_bank)


def test_a_writer_never_rewrites_a_shard_the_manifest_lists(f32_bank):
  with BankWriter(f32_bank) as w:
    w._manifest = dict(w._manifest, next_shard=1)  # as if the check on open had been skipped
    with pytest.raises(BankError, match=r"s000001: the manifest lists this shard; refusing"):
      w.append(make_docs(5, [2], SPEC))
  assert live_view(open_bank(f32_bank)) == live_view(
      MemoryBank.from_encoded(SPEC, concat(batches(SPEC)[:2])))


def test_a_bank_records_the_weights_that_encoded_it(tmp_path):
  path, a, b = tmp_path / "bank", "a" * 64, "b" * 64
  with BankWriter(path, SPEC, weights_sha256=a) as w:
    w.append(batches(SPEC)[0])
  open_bank(path, weights_sha256=a)
  open_bank(path)  # a reader that does not say which weights it has is not checked
  with pytest.raises(BankError, match=r"encoded by other weights \(weights_sha256 aaaaaaaaaaaa"):
    open_bank(path, weights_sha256=b)
  with pytest.raises(BankError, match=r"encoded by other weights"):
    BankWriter(path, weights_sha256=b)
  store.compact(path, max_shard_docs=1)  # every later write keeps the record
  with pytest.raises(BankError, match=r"encoded by other weights"):
    open_bank(path, weights_sha256=b)


def test_bad_input_rejected_at_append(tmp_path):
  with BankWriter(tmp_path / "bank", SPEC) as w:
    with pytest.raises(BankError, match=r"positions \[1\] have length \[0\]: empty documents"):
      w.append(make_docs(0, [3, 0, 2], SPEC))
    bad = make_docs(0, [3, 5], SPEC)
    bad.keys[1] = bad.keys[1][:-1]
    with pytest.raises(BankError, match=r"EncodedDocs.keys\[1\] has shape"):
      w.append(bad)
    bad = make_docs(0, [3, 5], SPEC)
    del bad.routing_keys[3]
    with pytest.raises(BankError, match=r"routing_keys has layers \[1\]"):
      w.append(bad)
    with pytest.raises(BankError, match=r"another writer"):
      BankWriter(tmp_path / "bank", SPEC)
    assert w.num_committed_docs == 0
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(BankError, match=r"non-empty directory"):
    BankWriter(tmp_path / "other", SPEC)
  with pytest.raises(BankError, match=r"no bank here"):
    BankWriter(tmp_path / "nothing")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_keys_or_values_are_never_stored(tmp_path, dtype):
  spec = spec_for(dtype)
  docs = make_docs(0, [3, 5], spec)
  docs.values[3][1, 0, 2] = np.nan
  docs.routing_keys[1][0, 1, 1] = np.inf
  with BankWriter(tmp_path / "bank", spec) as w:
    with pytest.raises(BankError, match=r"EncodedDocs\.routing_keys\[1\]: holds 1 non-finite"):
      w.append(docs)
    docs.routing_keys[1][0, 1, 1] = 0
    with pytest.raises(BankError, match=r"EncodedDocs\.values\[3\]: holds 1 non-finite"):
      w.append(docs)
    tpl = make_template(spec)
    tpl.keys[0][0, 0, 0] = np.nan
  with pytest.raises(BankError, match=r"Template\.keys\[0\]: holds 1 non-finite"):
    BankWriter(tmp_path / "other", spec, template=tpl)
  assert open_bank(tmp_path / "bank").doc_ids.size == 0


def test_template_is_fixed_at_creation(tmp_path):
  spec = spec_for("bfloat16")
  tpl = make_template(spec)
  build(tmp_path / "bank", spec, batches(spec)[:1], template=tpl)
  BankWriter(tmp_path / "bank", spec, template=tpl).close()  # the same template resumes
  other = make_template(spec)
  other.values[2] = other.values[2] + np.ones((), other.values[2].dtype)
  with pytest.raises(BankError, match=r"template/values_L2\.npy: differs from the given"):
    BankWriter(tmp_path / "bank", spec, template=other)


# --- dynamic memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_add_delete_replace_compact(tmp_path, dtype):
  spec = spec_for(dtype)
  path, docs = tmp_path / "bank", batches(spec)
  build(path, spec, docs[:3])  # ids 0..5
  assert store.add_documents(path, docs[3]).tolist() == [6, 7, 8]
  assert store.add_documents(path, docs[4], doc_ids=[40]).tolist() == [40]
  all_docs = concat(docs[:5])  # rows 0..9 -> ids 0..8, 40
  ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 40])

  store.delete_documents(path, [2, 7])
  bank = open_bank(path)
  assert bank.live.tolist() == [i not in (2, 7) for i in ids]  # not routable at once
  new4 = make_docs(7, [11], spec)
  store.replace_documents(path, new4, [4])
  bank = open_bank(path)
  assert bank.doc_ids.tolist() == ids.tolist() + [4]
  assert not bank.live[bank.doc_ids.tolist().index(4)] and bank.live[-1]
  store.add_documents(path, doc_slice(all_docs, [2], spec), doc_ids=[2])  # a deleted id returns

  # Reference: the same live documents, in the same order, written from scratch.
  keep = [0, 1, 3, 5, 6, 8, 9]
  ref_docs = concat([doc_slice(all_docs, keep, spec), new4, doc_slice(all_docs, [2], spec)])
  ref_ids = ids[keep].tolist() + [4, 2]
  ref = MemoryBank.from_encoded(spec, ref_docs, np.array(ref_ids))
  bank = open_bank(path)
  assert bank.doc_ids[bank.live].tolist() == ref_ids
  assert live_view(bank) == live_view(ref)

  size = lambda: sum(f.stat().st_size for f in (path / "shards").rglob("*.npy"))
  before = size()
  assert store.compact(path) == 3  # the rows of 7, the old 4 and the old 2
  bank = open_bank(path)
  assert bank.live.all() and bank.doc_ids.tolist() == ref_ids
  assert live_view(bank) == live_view(ref)
  assert size() < before and [p.name for p in (path / "shards").iterdir()] == ["s000007"]
  m, _ = store.read_manifest(path)
  assert m["tombstones"] == [] and m["next_doc_id"] == 41
  # Byte-identical to a bank written in one go with the same documents and ids.
  build(tmp_path / "ref", spec, [ref_docs], ids=[ref_ids])
  assert shard_files(path) == shard_files(tmp_path / "ref")
  assert store.add_documents(path, docs[5]).tolist() == [41, 42]  # ids are never reused
  assert store.compact(path, max_shard_docs=4) == 0
  bank = open_bank(path)
  assert bank.doc_ids.tolist() == ref_ids + [41, 42]
  assert [s["num_docs"] for s in store.read_manifest(path)[0]["shards"]] == [4, 4, 3]
  assert_banks_equal(open_bank(path, mmap=False), MemoryBank.from_encoded(
      spec, concat([ref_docs, docs[5]]), np.array(ref_ids + [41, 42])))


def test_unknown_ids_are_errors(f32_bank):
  with BankWriter(f32_bank) as w:
    with pytest.raises(store.UnknownDocumentError, match=r"ids \[17\] are not live"):
      w.delete([17])
    w.delete([1])
    with pytest.raises(store.UnknownDocumentError, match=r"ids \[1\] are not live"):
      w.delete([1, 0])  # all or nothing: 0 stays
    with pytest.raises(store.UnknownDocumentError, match=r"ids \[1\]"):
      w.replace(make_docs(1, [2], SPEC), [1])
    with pytest.raises(BankError, match=r"ids \[0\] are already live"):
      w.append(make_docs(1, [2], SPEC), [0])
    assert w.live_doc_ids.tolist() == [0, 2, 3]


def test_compaction_is_crash_safe(tmp_path, monkeypatch):
  path, docs = tmp_path / "bank", batches(SPEC)
  build(path, SPEC, docs[:3])
  store.delete_documents(path, [0, 4])
  before = open_bank(path)
  monkeypatch.setattr(store, "_publish_manifest", lambda *a: (_ for _ in ()).throw(
      KeyboardInterrupt("killed")))
  with pytest.raises(KeyboardInterrupt):
    store.compact(path)
  monkeypatch.undo()
  assert_banks_equal(open_bank(path), before)
  assert sorted(p.name for p in (path / "shards").iterdir()) == ["s000000", "s000001",
                                                                  "s000002"]
  assert store.compact(path) == 2
  assert live_view(open_bank(path)) == live_view(before)


# --- document texts -----------------------------------------------------------------------------


def test_texts_and_titles_follow_their_documents_through_dynamic_memory(tmp_path):
  path = tmp_path / "bank"
  docs = batches(SPEC)
  with BankWriter(path, SPEC) as w:
    w.append(docs[0], texts=["alpha\nbeta", "γάμμα ✓", "delta"], titles=["a", None, "c"])
    w.append(docs[1])  # no texts: this document has none
    w.append(docs[2], [10, 11], texts=["x", None], titles=[None, "only a title"])
  want = {0: store.DocText("alpha\nbeta", "a"), 1: store.DocText("γάμμα ✓", None),
          2: store.DocText("delta", "c"), 10: store.DocText("x", None),
          11: store.DocText(None, "only a title")}
  assert store.read_texts(path) == want
  store.delete_documents(path, [1])
  store.replace_documents(path, make_docs(7, [2], SPEC), [2])  # replaced without a text
  del want[1], want[2]
  assert store.read_texts(path) == want
  for max_shard_docs in (None, 2):
    store.compact(path, max_shard_docs=max_shard_docs)
    assert store.read_texts(path) == want
    assert open_bank(path).doc_ids.tolist() == [0, 3, 10, 11, 2]


def test_a_damaged_texts_file_is_named(tmp_path):
  path = tmp_path / "bank"
  with BankWriter(path, SPEC) as w:
    w.append(batches(SPEC)[0], texts=["one", "two", "three"])
  f = path / "shards" / "s000000" / "texts.jsonl"
  f.write_bytes(f.read_bytes().replace(b"two", b"twx"))
  with pytest.raises(BankError, match=r"s000000/texts\.jsonl: size or checksum differs"):
    store.read_texts(path)
  with pytest.raises(BankError, match=r"texts\.jsonl: size or checksum differs"):
    store.compact(path, max_shard_docs=1)


def test_texts_must_be_one_string_or_none_per_document(tmp_path):
  with BankWriter(tmp_path / "bank", SPEC) as w:
    with pytest.raises(BankError, match=r"texts/titles: 2/3 given for 3 documents"):
      w.append(batches(SPEC)[0], texts=["a", "b"])
    with pytest.raises(BankError, match=r"must be strings or None \(entry 1"):
      w.append(batches(SPEC)[0], titles=["a", 5, "c"])
    assert w.num_committed_docs == 0


@pytest.mark.parametrize("max_shard_docs", [None, 2, 7])
def test_compacting_a_compact_bank_changes_nothing(tmp_path, max_shard_docs):
  path = tmp_path / "bank"
  build(path, SPEC, batches(SPEC))  # 12 documents in 6 shards
  store.delete_documents(path, [3])
  n = 11
  assert store.compact(path, max_shard_docs=max_shard_docs) == 1
  manifest = (path / "manifest.json").read_bytes()
  assert store.compact(path, max_shard_docs=max_shard_docs) == 0
  assert (path / "manifest.json").read_bytes() == manifest  # no rewrite, no new generation
  sizes = [s["num_docs"] for s in json.loads(manifest)["shards"]]
  assert sizes == ([n] if max_shard_docs is None else
                   [max_shard_docs] * (n // max_shard_docs) + [n % max_shard_docs] * bool(
                       n % max_shard_docs))


@pytest.mark.parametrize("verify", [True, False])
def test_a_reader_gets_a_snapshot_when_a_compaction_removes_files_under_it(f32_bank, monkeypatch,
                                                                           verify):
  """A shard file vanishes after the reader found it listed (and sized): it starts over from
  the newer manifest instead of failing."""
  store.delete_documents(f32_bank, [1])
  after = tmp = None
  real = store._sha256_file if verify else np.load
  fired = []

  def vanish_then_read(path, *args, **kwargs):
    nonlocal after
    if not fired and "shards" in str(path):
      fired.append(path)
      monkeypatch.setattr(*target, real)  # the compaction itself reads normally
      store.compact(f32_bank)
      monkeypatch.setattr(*target, vanish_then_read)
    return real(path, *args, **kwargs)

  target = (store, "_sha256_file") if verify else (np, "load")
  monkeypatch.setattr(*target, vanish_then_read)
  got = open_bank(f32_bank, verify=verify, mmap=False)
  monkeypatch.undo()
  assert fired and not fired[0].exists()
  assert live_view(got) == live_view(open_bank(f32_bank))
  assert got.live.all() and 1 not in got.doc_ids.tolist()


def _compactor_main(path: str, seconds: float) -> None:
  """Compacts the bank over and over (alternating shard sizes, so every call rewrites)."""
  end, i = time.time() + seconds, 0
  while time.time() < end:
    store.compact(path, max_shard_docs=2 + i % 2)
    i += 1
  print(i)


def test_readers_never_fail_while_another_process_compacts(f32_bank):
  store.compact(f32_bank, max_shard_docs=3)
  proc = subprocess.Popen([sys.executable, __file__, "compactor", str(f32_bank), "4"],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
  want, opens = live_view(open_bank(f32_bank)), 0
  while proc.poll() is None:
    for verify in (True, False):
      assert live_view(open_bank(f32_bank, verify=verify)) == want
      opens += 1
  assert proc.returncode == 0
  assert int(proc.stdout.read()) > 10 and opens > 50


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
  _writer_main(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and sys.argv[1:2] == ["compactor"]:
  _compactor_main(sys.argv[2], float(sys.argv[3]))
