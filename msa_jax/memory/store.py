"""The memory bank on disk: a versioned, append-only, crash-safe store with dynamic memory.

Format "msa-jax-memory-bank", version 1
=======================================

A bank is a directory::

  <bank>/
    manifest.json          the only source of truth; replaced atomically, never edited in place
    template/              optional; written once when the bank is created
      tokens.npy           int64 [t]
      keys_L{l}.npy        [t, K, H] for every layer l = 0 .. num_layers-1 (after k_norm and RoPE)
      values_L{l}.npy      [t, K, H]
    shards/
      s000000/             one append = one shard; shard directories are never modified
        doc_ids.npy        int64 [m]  stable document ids, unique within the shard
        lengths.npy        int64 [m]  tokens per document, >= 1
        keys_L{l}.npy          [c, K, H]  pooled keys (after k_norm and RoPE)   } for every
        values_L{l}.npy        [c, K, H]  pooled values                         } router layer l
        routing_keys_L{l}.npy  [c, K, H]  pooled routing keys                   } (spec order)
        texts.jsonl        optional: per document (file order) {"text": str|null, "title":
                           str|null}, one JSON object a line: the original text that Memory
                           Interleave appends and that answers show
      s000001/ ...
    .lock                  advisory lock (flock) held by the one active writer; not bank data
    .tmp-*                 uncommitted work of a writer; ignored by readers, removed by writers
    manifest.json.tmp-*    likewise

Array files are plain `.npy` (format 1.0, C order, little endian, no pickled objects: every load
uses `allow_pickle=False`), so they can be memory-mapped with `np.load(path, mmap_mode="r")`.
`c` is the shard's chunk count, `sum(ceil(lengths / P))` with P the spec's pooling size; document
i of a shard owns the next `ceil(lengths[i] / P)` chunks, in document order.

Storage dtypes (the manifest's `spec.dtype` says which one): "float32" is stored as `<f4`,
"float16" as `<f2`, and "bfloat16" as `<u2` holding the raw bfloat16 bit patterns (numpy writes
ml_dtypes' bfloat16 as an opaque `<V2` that does not load back as bfloat16); a reader views
those files as `ml_dtypes.bfloat16`. Ids, lengths and template tokens are always `<i8`.

manifest.json is a JSON object::

  {
    "format": "msa-jax-memory-bank",
    "version": 1,
    "spec": {                       # the BankSpec fields; a bank opens only for an equal spec
      "config_fingerprint": str, "router_layers": [int, ...], "num_layers": int,
      "num_kv_heads": int, "head_dim": int, "pooling_size": int, "dtype": str},
    "generation": int,              # +1 on every manifest write
    "next_shard": int,              # shard names are "s%06d" % n, never reused
    "next_doc_id": int,             # automatically assigned ids continue from here
    "num_docs": int,                # stored document rows, dead ones included (= sum of shards)
    "num_live_docs": int,
    "num_chunks": int,              # = sum of shards' num_chunks
    "tombstones": [int, ...],       # ascending ids deleted (no live version)
    "template": null | {"length": int, "files": FILES},
    "shards": [{"name": str, "num_docs": int, "num_chunks": int, "files": FILES,
                "generation": int}, ...],   # the generation that committed the shard
    "inputs": [{"sha256": str, "num_docs": int, "first_id": int, "committed": int}, ...],
    "weights_sha256": str | null,   # `nn.model.weights_fingerprint` of the encoding model
    "checksum": str                 # sha256 of the canonical JSON of every other key
  }

where FILES maps every file name of that directory to `{"bytes": int, "sha256": str}` of the
whole file (header included; sha256 as 64 lowercase hex digits). Every shard holds at least one
document; document ids are integers >= 0. Document rows are numbered in shard order (shards in
manifest order, rows in file order); that is `MemoryBank`'s row order. Readers reject a manifest
whose format or version differs, whose fields are missing or of the wrong type, or whose counts
disagree with each other or with the files, and a file whose size, header or checksum differs
from its entry. The manifest's own `checksum` (sha256 of `json.dumps(manifest without
"checksum", sort_keys=True, separators=(",", ":"))`) is checked before anything it lists, so a
damaged manifest is reported as such. Invariants checked on every open: shard names ascend in
commit order and lie below `next_shard`; shard generations do not decrease and do not pass the
manifest's; `next_doc_id` is above every stored id; tombstones name stored ids. `checksum`,
per-shard `generation`, `inputs` and `weights_sha256` were added to version 1 later: manifests
without them still open (nothing to check), and every write adds them. `weights_sha256` tells
apart two models of one config (the spec's config fingerprint cannot): a reader or writer that
names its model's fingerprint is refused a bank encoded by other weights.

`inputs` is what makes `msa_jax.engine.encode.encode_to_bank` resumable without trusting a count:
one record per input (a fingerprint of all its documents) that an encode committed documents
from, with the ids it gave them (`first_id + i`) and how many are committed. Re-running an encode
finds its record and continues after `committed`; an input with another fingerprint is refused
unless it is appended as new documents.

Liveness: a row is live iff its id is not in `tombstones` and no later row has the same id. So
deleting adds the id to `tombstones`; replacing appends a shard with the same id (the older row
is superseded in the same manifest write); adding an id that was deleted removes it from
`tombstones`. Dead rows stay stored (and `MemoryBank.live` is false for them) until `compact`
rewrites the live rows, in row order and with their ids, into fresh shards and clears
`tombstones`.

Commit protocol (one writer at a time, under the lock): a shard is written into
`<bank>/.tmp-*`, each file fsynced, the directory fsynced and renamed to `shards/<name>`; then
the manifest listing it is written to `manifest.json.tmp-*`, fsynced, `os.replace`d over
manifest.json and the bank directory fsynced. A writer killed at any point leaves the previous
manifest intact, and that manifest lists only complete shards; leftovers (temp files, shard
directories no manifest lists) are removed by the next writer. Compaction writes its new shards
the same way, swaps the manifest, and only then deletes the old shards (a reader that finds a
listed file gone re-reads the manifest when its `generation` changed meanwhile).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import secrets
import shutil
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from msa_jax.memory.bank import BankSpec, EncodedDocs, MemoryBank, Template

try:
  import fcntl
except ImportError:  # pragma: no cover - non-POSIX
  fcntl = None

FORMAT_NAME = "msa-jax-memory-bank"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
TEMPLATE = "template"
TEXTS = "texts.jsonl"  # optional per shard: the documents' original text and titles
_LOCK = ".lock"
_TMP = ".tmp-"
_MANIFEST_TMP = MANIFEST + ".tmp-"
_SHARD_NAME = re.compile(r"s\d{6,}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_BLOCK_BYTES = 32 << 20  # rows are written / copied in blocks of about this size
_OPEN_ATTEMPTS = 64  # manifests a reader tries while compactions replace shards under it

PathLike = str | os.PathLike

# spec dtype -> (in-memory dtype, on-disk dtype)
_DTYPES = {
    "float32": (np.dtype(np.float32), np.dtype("<f4")),
    "float16": (np.dtype(np.float16), np.dtype("<f2")),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype("<u2")),
}
_INT = np.dtype("<i8")


class BankError(Exception):
  """A bank that cannot be opened or written as asked (the message names the file or field)."""


class UnknownDocumentError(BankError, KeyError):
  """A document id that is not live in the bank."""

  __str__ = Exception.__str__


class _MissingFile(BankError):
  pass


@dataclasses.dataclass(frozen=True)
class DocText:
  """A document's original text and title, as a bank keeps them (either may be None)."""

  text: str | None
  title: str | None = None


def _texts_blob(texts: Sequence[DocText]) -> bytes:
  """texts.jsonl: one JSON object a document (JSON escapes newlines, so one line each)."""
  return "".join(json.dumps({"text": t.text, "title": t.title}, ensure_ascii=False) + "\n"
                 for t in texts).encode()


def _parse_texts(raw: bytes, n: int, where: pathlib.Path) -> list[DocText]:
  try:
    lines = raw.decode().split("\n")
  except UnicodeDecodeError as e:
    raise BankError(f"{where}: not UTF-8 ({e})") from None
  if lines[-1] != "" or len(lines) != n + 1:
    raise BankError(f"{where}: expected {n} lines, one per document")
  out = []
  for i, line in enumerate(lines[:-1], 1):
    try:
      d = json.loads(line)
    except ValueError:
      d = None
    if not (isinstance(d, dict) and set(d) == {"text", "title"}
            and all(v is None or isinstance(v, str) for v in d.values())):
      raise BankError(f"{where}:{i}: expected {{\"text\": str|null, \"title\": str|null}}")
    out.append(DocText(d["text"], d["title"]))
  return out


def _check_texts(texts, titles, m: int) -> list[DocText] | None:
  """The `texts`/`titles` arguments of an append as m DocTexts, or None when neither is given."""
  if texts is None and titles is None:
    return None
  texts = [None] * m if texts is None else list(texts)
  titles = [None] * m if titles is None else list(titles)
  if len(texts) != m or len(titles) != m:
    raise BankError(f"texts/titles: {len(texts)}/{len(titles)} given for {m} documents")
  bad = [i for i, v in enumerate(texts + titles) if v is not None and not isinstance(v, str)]
  if bad:
    raise BankError(f"texts and titles must be strings or None (entry {bad[0] % m} is not)")
  return [DocText(t, h) for t, h in zip(texts, titles)]


@dataclasses.dataclass(frozen=True)
class InputRecord:
  """What a resumable encode was given, as the manifest's `inputs` remember it.

  Document i of that input has id `first_id + i`; documents 0 .. committed-1 are committed (they
  may have been deleted or replaced since: the record still counts them, so a re-run of the same
  encode never brings them back).
  """

  sha256: str     # fingerprint of the input documents (`msa_jax.engine.encode.fingerprint`)
  num_docs: int
  first_id: int
  committed: int = 0


# --- small helpers ------------------------------------------------------------------------------


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _publish_dir(tmp: pathlib.Path, target: pathlib.Path) -> None:
  """Renames a fully written (and fsynced) directory into place (the caller checked that no
  committed manifest lists `target`)."""
  if target.exists():  # a shard a killed or failed writer renamed but never committed
    shutil.rmtree(target)
  os.rename(tmp, target)
  _fsync_dir(target.parent)
  _fsync_dir(tmp.parent)


def _publish_manifest(tmp: pathlib.Path, target: pathlib.Path) -> None:
  os.replace(tmp, target)
  _fsync_dir(target.parent)


def _tmp_name(kind: str) -> str:
  return f"{_TMP}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _dtypes(spec: BankSpec) -> tuple[np.dtype, np.dtype]:
  try:
    return _DTYPES[spec.dtype]
  except KeyError:
    raise BankError(f"unsupported bank dtype {spec.dtype!r}; one of {sorted(_DTYPES)}") from None


def _to_disk(a: np.ndarray, spec: BankSpec, what: str) -> np.ndarray:
  """Host array in the spec dtype, as the on-disk dtype (bfloat16 -> its uint16 bit patterns)."""
  mem, disk = _dtypes(spec)
  a = np.asarray(a)
  if a.dtype.kind in "biuOSUM":
    raise BankError(f"{what}: expected a floating-point array, got dtype {a.dtype}")
  a = a.astype(mem, copy=False)
  bad = int(a.size - np.count_nonzero(np.isfinite(a)))
  if bad:  # NaN K/V (e.g. from an out-of-vocabulary token) would poison every later request
    raise BankError(f"{what}: holds {bad} non-finite values (NaN/Inf); a bank stores only finite "
                    "keys and values")
  if spec.dtype == "bfloat16":
    a = a.view(np.uint16)
  return np.ascontiguousarray(a.astype(disk, copy=False))


def _from_disk(a: np.ndarray, spec: BankSpec) -> np.ndarray:
  return a.view(ml_dtypes.bfloat16) if spec.dtype == "bfloat16" else a


def _row_blocks(a: np.ndarray) -> Iterator[np.ndarray]:
  row = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize)
  step = max(1, _BLOCK_BYTES // row)
  for s in range(0, a.shape[0], step):
    yield a[s:s + step]
  if a.shape[0] == 0:
    yield a


class _HashSink:
  """A write-only file object that only hashes and counts."""

  def __init__(self):
    self.sha, self.n = hashlib.sha256(), 0

  def write(self, b) -> None:
    self.sha.update(b)
    self.n += len(b)


def _write_npy(f, dtype: np.dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray]
               ) -> dict[str, Any]:
  """Writes a .npy (header, then C-order rows from `blocks`) to `f`; returns its FILES entry."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": tuple(int(s) for s in shape)})
  header = buf.getvalue()
  sha, n = hashlib.sha256(header), len(header)
  f.write(header)
  rows = 0
  for b in blocks:
    if b.dtype != dtype or b.shape[1:] != tuple(shape[1:]):
      raise AssertionError(f"block {b.dtype}{b.shape} does not fit {dtype}{shape}")
    mv = memoryview(np.ascontiguousarray(b)).cast("B")
    f.write(mv)
    sha.update(mv)
    n += len(mv)
    rows += b.shape[0]
  if rows != shape[0]:
    raise AssertionError(f"wrote {rows} rows, header says {shape[0]}")
  return {"bytes": n, "sha256": sha.hexdigest()}


def _write_npy_file(path: pathlib.Path, dtype: np.dtype, shape: tuple[int, ...],
                    blocks: Iterable[np.ndarray]) -> dict[str, Any]:
  with open(path, "xb") as f:
    entry = _write_npy(f, dtype, shape, blocks)
    f.flush()
    os.fsync(f.fileno())
  return entry


def _write_raw_file(path: pathlib.Path, data: bytes) -> dict[str, Any]:
  with open(path, "xb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _npy_entry(a: np.ndarray) -> dict[str, Any]:
  """The FILES entry that writing `a` (already in its on-disk dtype) would produce."""
  sink = _HashSink()
  _write_npy(sink, a.dtype, a.shape, _row_blocks(a))
  return {"bytes": sink.n, "sha256": sink.sha.hexdigest()}


def _sha256_file(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _shard_files(spec: BankSpec) -> list[str]:
  names = ["doc_ids.npy", "lengths.npy"]
  for l in spec.router_layers:
    names += [f"keys_L{l}.npy", f"values_L{l}.npy", f"routing_keys_L{l}.npy"]
  return names


def _template_files(spec: BankSpec) -> list[str]:
  names = ["tokens.npy"]
  for l in range(spec.num_layers):
    names += [f"keys_L{l}.npy", f"values_L{l}.npy"]
  return names


def _chunk_counts(lengths: np.ndarray, pooling_size: int) -> np.ndarray:
  return -(-lengths.astype(np.int64) // pooling_size)


def _liveness(ids: np.ndarray, tombstones: Iterable[int]) -> np.ndarray:
  """[M] bool: the last row of each id, unless the id is tombstoned."""
  live = np.zeros(ids.shape[0], bool)
  if ids.size:
    _, first_from_end = np.unique(ids[::-1], return_index=True)
    live[ids.shape[0] - 1 - first_from_end] = True
    live &= ~np.isin(ids, np.asarray(sorted(tombstones), np.int64))
  return live


def _check_spec_values(spec: BankSpec) -> None:
  _dtypes(spec)
  layers = tuple(spec.router_layers)
  if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 \
      or layers[-1] >= spec.num_layers:
    raise BankError(f"spec.router_layers={layers} must be ascending, unique, "
                    f"within 0..{spec.num_layers - 1}")
  for name in ("num_layers", "num_kv_heads", "head_dim", "pooling_size"):
    if getattr(spec, name) < 1:
      raise BankError(f"spec.{name}={getattr(spec, name)} must be >= 1")


def _compare_specs(stored: BankSpec, requested: BankSpec, where: pathlib.Path) -> None:
  diffs = [f.name for f in dataclasses.fields(BankSpec)
           if _spec_value(stored, f.name) != _spec_value(requested, f.name)]
  if diffs:
    detail = "; ".join(f"{n}: bank has {_spec_value(stored, n)!r}, requested "
                       f"{_spec_value(requested, n)!r}" for n in diffs)
    raise BankError(f"{where}: the bank was built for a different model or spec: {detail}")


def _spec_value(spec: BankSpec, name: str):
  v = getattr(spec, name)
  return tuple(int(x) for x in v) if name == "router_layers" else v


# --- the manifest -------------------------------------------------------------------------------


def _malformed(path: pathlib.Path, why: str) -> BankError:
  return BankError(f"{path}: malformed manifest ({why})")


def _get(d: dict, key: str, types, path: pathlib.Path, where: str = ""):
  if not isinstance(d, dict) or key not in d:
    raise _malformed(path, f"missing key {where}{key!r}")
  v = d[key]
  if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
    raise _malformed(path, f"{where}{key!r} has the wrong type {type(v).__name__}")
  return v


def _as_tuple(t):
  return t if isinstance(t, tuple) else (t,)


def _int(d: dict, key: str, path: pathlib.Path, where: str = "", minimum: int = 0) -> int:
  v = _get(d, key, int, path, where)
  if v < minimum:
    raise _malformed(path, f"{where}{key!r}={v} must be >= {minimum}")
  return v


def _parse_files(d: dict, expected: list[str], path: pathlib.Path, where: str,
                 optional: tuple[str, ...] = ()) -> dict:
  files = _get(d, "files", dict, path, where)
  if sorted(set(files) - set(optional)) != sorted(expected):
    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected) - set(optional))
    raise _malformed(path, f"{where}files: missing {missing}, unexpected {extra}")
  for name, entry in files.items():
    _int(entry, "bytes", path, f"{where}files[{name!r}].")
    sha = _get(entry, "sha256", str, path, f"{where}files[{name!r}].")
    if not _SHA256.match(sha):
      raise _malformed(path, f"{where}files[{name!r}].sha256 is not a sha256 hex digest")
  return files


def _spec_from_json(d: dict, path: pathlib.Path) -> BankSpec:
  fields = {f.name for f in dataclasses.fields(BankSpec)}
  if set(d) != fields:
    raise _malformed(path, f"spec fields: missing {sorted(fields - set(d))}, "
                           f"unexpected {sorted(set(d) - fields)}")
  layers = _get(d, "router_layers", list, path, "spec.")
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
    raise _malformed(path, "spec.router_layers must be a list of integers")
  spec = BankSpec(config_fingerprint=_get(d, "config_fingerprint", str, path, "spec."),
                  router_layers=tuple(layers), num_layers=_int(d, "num_layers", path, "spec."),
                  num_kv_heads=_int(d, "num_kv_heads", path, "spec."),
                  head_dim=_int(d, "head_dim", path, "spec."),
                  pooling_size=_int(d, "pooling_size", path, "spec."),
                  dtype=_get(d, "dtype", str, path, "spec."))
  try:
    _check_spec_values(spec)
  except BankError as e:
    raise _malformed(path, str(e)) from None
  return spec


def _spec_to_json(spec: BankSpec) -> dict:
  d = dataclasses.asdict(spec)
  d["router_layers"] = [int(x) for x in spec.router_layers]
  return d


def _manifest_digest(m: dict) -> str:
  """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without "checksum"."""
  body = {k: v for k, v in m.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                        ).hexdigest()


def _parse_manifest(raw: bytes, path: pathlib.Path) -> tuple[dict, BankSpec]:
  try:
    m = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise _malformed(path, f"not valid JSON: {e}") from None
  if not isinstance(m, dict):
    raise _malformed(path, "not a JSON object")
  # Checked first: a damaged manifest must be reported as such, not as a damaged file it lists.
  if "checksum" in m and m["checksum"] != _manifest_digest(m):
    raise BankError(f"{path}: the manifest's checksum does not match its contents: the manifest "
                    "was edited or damaged (the shard files were not checked)")
  fmt = m.get("format")
  if fmt != FORMAT_NAME:
    raise BankError(f"{path}: not a memory bank manifest (format {fmt!r}, expected "
                    f"{FORMAT_NAME!r})")
  version = m.get("version")
  if version != FORMAT_VERSION:
    raise BankError(f"{path}: unsupported bank format version {version!r} (this reader "
                    f"supports version {FORMAT_VERSION})")
  spec = _spec_from_json(_get(m, "spec", dict, path), path)
  for key in ("generation", "next_shard", "next_doc_id", "num_docs", "num_live_docs",
              "num_chunks"):
    _int(m, key, path)
  tombs = _get(m, "tombstones", list, path)
  if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in tombs) \
      or tombs != sorted(set(tombs)):
    raise _malformed(path, "tombstones must be ascending unique non-negative integers")
  if "template" not in m:
    raise _malformed(path, "missing key 'template'")
  template = m["template"]
  if template is not None:
    _int(template, "length", path, "template.")
    _parse_files(template, _template_files(spec), path, "template.")
  shards = _get(m, "shards", list, path)
  last_number, last_generation = -1, 0
  for i, s in enumerate(shards):
    where = f"shards[{i}]."
    name = _get(s, "name", str, path, where)
    if not _SHARD_NAME.match(name):
      raise _malformed(path, f"{where}name {name!r} is not a valid shard name")
    # Shards are numbered in commit order and never reused: names unique, ascending, and below
    # next_shard (else the next append would reuse a committed shard's name).
    number = int(name[1:])
    if number <= last_number:
      raise _malformed(path, f"{where}name {name!r} repeats or is out of order (shard names "
                             "ascend in commit order)")
    if number >= m["next_shard"]:
      raise _malformed(path, f"next_shard={m['next_shard']} but shard {name!r} is listed "
                             "(next_shard must be above every shard's number)")
    last_number = number
    _int(s, "num_docs", path, where, minimum=1)
    _int(s, "num_chunks", path, where, minimum=1)
    _parse_files(s, _shard_files(spec), path, where, optional=(TEXTS,))
    if "generation" in s:  # the manifest generation that committed the shard (absent before)
      g = _int(s, "generation", path, where, minimum=1)
      if g < last_generation or g > m["generation"]:
        raise _malformed(path, f"{where}generation={g} is out of order or above the manifest's "
                               f"generation {m['generation']} (generations only grow)")
      last_generation = g
  if m.get("weights_sha256") is not None and not (
      isinstance(m["weights_sha256"], str) and _SHA256.match(m["weights_sha256"])):
    raise _malformed(path, "weights_sha256 is not a sha256 hex digest")
  fingerprints = set()
  for i, rec in enumerate(_get(m, "inputs", list, path) if "inputs" in m else []):
    where = f"inputs[{i}]."
    sha = _get(rec, "sha256", str, path, where)
    if not _SHA256.match(sha) or sha in fingerprints:
      raise _malformed(path, f"{where}sha256 is not a unique sha256 hex digest")
    fingerprints.add(sha)
    n = _int(rec, "num_docs", path, where, minimum=1)
    _int(rec, "first_id", path, where)
    done = _int(rec, "committed", path, where)
    if done > n:
      raise _malformed(path, f"{where}committed={done} is above its num_docs={n}")
  if m["num_docs"] != sum(s["num_docs"] for s in shards):
    raise _malformed(path, "num_docs is not the sum of the shards' num_docs")
  if m["num_chunks"] != sum(s["num_chunks"] for s in shards):
    raise _malformed(path, "num_chunks is not the sum of the shards' num_chunks")
  if m["num_live_docs"] > m["num_docs"]:
    raise _malformed(path, "num_live_docs > num_docs")
  return m, spec


def check_model(path: PathLike, spec: BankSpec | None = None,
                weights_sha256: str | None = None) -> BankSpec:
  """Raises `BankError` unless the bank at `path` was built for `spec` (when given) by weights
  with this fingerprint (when given and recorded); returns the stored spec. Reads the manifest
  only."""
  path = pathlib.Path(path)
  m, stored = read_manifest(path)
  if spec is not None:
    _compare_specs(stored, spec, path / MANIFEST)
  _check_weights(m, weights_sha256, path / MANIFEST)
  return stored


def read_manifest(path: PathLike) -> tuple[dict, BankSpec]:
  """The validated manifest of the bank at `path` and its spec."""
  path = pathlib.Path(path)
  mpath = path / MANIFEST
  try:
    raw = mpath.read_bytes()
  except FileNotFoundError:
    raise BankError(f"{mpath}: missing file (no memory bank at {path})") from None
  return _parse_manifest(raw, mpath)


# --- reading ------------------------------------------------------------------------------------


def _load_npy(path: pathlib.Path, entry: dict, dtype: np.dtype, shape: tuple[int, ...], *,
              verify: bool, mmap: bool) -> np.ndarray:
  """Checks a listed file (present, exact size, checksum if `verify`, header) and loads it."""
  # A file can vanish at any of these steps when a compaction removes the shards of an older
  # manifest: that is a _MissingFile, which `open_bank` retries with the new manifest.
  missing = _MissingFile(f"{path}: missing file (listed in the manifest)")
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    raise missing from None
  if size != entry["bytes"]:
    what = "truncated" if size < entry["bytes"] else "wrong size"
    raise BankError(f"{path}: {what} file ({size} bytes, the manifest says {entry['bytes']})")
  if verify:
    try:
      got = _sha256_file(path)
    except FileNotFoundError:
      raise missing from None
    if got != entry["sha256"]:
      raise BankError(f"{path}: checksum mismatch (sha256 {got}, the manifest says "
                      f"{entry['sha256']}); the file is corrupt")
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  try:
    a = np.load(path, mmap_mode="r" if mmap and nbytes else None, allow_pickle=False)
  except FileNotFoundError:
    raise missing from None
  except (ValueError, OSError, EOFError) as e:
    raise BankError(f"{path}: unreadable .npy file ({e})") from None
  if a.dtype != dtype or a.shape != tuple(shape):
    raise BankError(f"{path}: holds {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
  return a


class ChunkArray:
  """A read-only [C, K, H] array stored as per-shard parts (memory-mapped), never concatenated.

  Indexing along the chunk axis (an int, a slice, an integer or boolean array, optionally
  followed by more indices) reads only the requested chunks; `np.asarray` materialises it all.
  """

  def __init__(self, parts: Sequence[np.ndarray]):
    if not parts:
      raise ValueError("ChunkArray needs at least one part")
    self.parts = tuple(parts)
    tail, dtype = self.parts[0].shape[1:], self.parts[0].dtype
    if any(p.shape[1:] != tail or p.dtype != dtype for p in self.parts):
      raise ValueError("ChunkArray parts differ in trailing shape or dtype")
    sizes = np.array([p.shape[0] for p in self.parts], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [parts + 1]
    self.shape = (int(self.starts[-1]),) + tuple(tail)
    self.dtype = dtype

  ndim = property(lambda self: len(self.shape))
  size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
  nbytes = property(lambda self: self.size * self.dtype.itemsize)

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return f"ChunkArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

  def __array__(self, dtype=None, copy=None):
    a = np.concatenate(self.parts) if len(self.parts) > 1 else np.array(self.parts[0])
    return a if dtype is None else a.astype(dtype, copy=False)

  def take(self, rows) -> np.ndarray:
    """rows (any shape, ints, negatives wrap) -> [*rows.shape, K, H] read from the parts."""
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
      raise IndexError(f"chunk indices must be integers, got {rows.dtype}")
    flat = rows.reshape(-1).astype(np.int64)
    n = self.shape[0]
    if flat.size and (flat.min() < -n or flat.max() >= n):
      raise IndexError(f"chunk index out of range for {n} chunks")
    flat = np.where(flat < 0, flat + n, flat)
    out = np.empty((flat.size,) + self.shape[1:], self.dtype)
    part = np.searchsorted(self.starts, flat, side="right") - 1
    for p in np.unique(part):
      sel = part == p
      out[sel] = self.parts[p][flat[sel] - self.starts[p]]
    return out.reshape(rows.shape + self.shape[1:])

  def __getitem__(self, idx):
    if isinstance(idx, tuple):
      if not idx:
        return np.asarray(self)
      if any(i is Ellipsis or i is None for i in idx[:1]):
        return np.asarray(self)[idx]
      head = self[idx[0]]
      rest = idx[1:]
      if isinstance(idx[0], (int, np.integer)):
        return head[rest]
      return head[(slice(None),) + rest]
    if isinstance(idx, (int, np.integer)):
      return self.take(np.asarray(idx, np.int64))
    if isinstance(idx, slice):
      start, stop, step = idx.indices(self.shape[0])
      return self.take(np.arange(start, stop, step, dtype=np.int64))
    if idx is Ellipsis:
      return np.asarray(self)
    a = np.asarray(idx)
    if a.dtype == bool:
      if a.shape != (self.shape[0],):
        raise IndexError(f"boolean index of shape {a.shape} for {self.shape[0]} chunks")
      a = np.flatnonzero(a)
    return self.take(a)


class ContentReader:
  """Reads content K̄/V̄ chunks of a bank, only those asked for (from memory maps on disk when
  the bank was opened with `open_bank(mmap=True)`, else from memory).

  `bytes_read` counts the bytes returned, for tests and stats.
  """

  def __init__(self, bank: MemoryBank):
    self.bank = bank
    self.bytes_read = 0

  def gather(self, layer: int, rows) -> tuple[np.ndarray, np.ndarray]:
    """Chunk rows (any shape) of router layer `layer` -> keys, values [*rows.shape, K, H]."""
    if layer not in self.bank.keys:
      raise KeyError(f"layer {layer} is not a router layer of this bank "
                     f"{tuple(self.bank.keys)}")
    rows = np.asarray(rows, np.int64)
    keys, values = self.bank.keys[layer], self.bank.values[layer]
    k = keys.take(rows) if isinstance(keys, ChunkArray) else np.asarray(keys[rows.reshape(-1)])
    v = values.take(rows) if isinstance(values, ChunkArray) else np.asarray(
        values[rows.reshape(-1)])
    shape = rows.shape + tuple(keys.shape[1:])
    self.bytes_read += k.nbytes + v.nbytes
    return k.reshape(shape), v.reshape(shape)

  def doc_chunks(self, doc_rows) -> np.ndarray:
    """[sum chunks] chunk rows of the given bank rows (documents), concatenated in that order."""
    doc_rows = np.asarray(doc_rows, np.int64).reshape(-1)
    off, cnt = self.bank.chunk_offset[doc_rows], self.bank.chunk_count[doc_rows]
    return (np.concatenate([np.arange(o, o + c) for o, c in zip(off, cnt)]).astype(np.int64)
            if doc_rows.size else np.zeros(0, np.int64))

  def gather_docs(self, layer: int, doc_rows) -> tuple[np.ndarray, np.ndarray]:
    """All chunks of the given documents (bank rows), in that order: keys, values [c, K, H]."""
    return self.gather(layer, self.doc_chunks(doc_rows))


def _check_weights(m: dict, weights_sha256: str | None, path: pathlib.Path) -> None:
  stored = m.get("weights_sha256")
  if weights_sha256 is not None and stored is not None and stored != weights_sha256:
    raise BankError(f"{path}: the bank was encoded by other weights (weights_sha256 "
                    f"{stored[:12]}..., this model's {weights_sha256[:12]}...): a model of the "
                    "same config but other weights would read keys it did not write")


def _check_ids(m: dict, ids: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Checks the manifest's id bookkeeping against the stored ids [M]; returns liveness [M]."""
  if ids.size and int(ids.max()) >= m["next_doc_id"]:
    raise _malformed(path, f"next_doc_id={m['next_doc_id']} but id {int(ids.max())} is stored "
                           "(next_doc_id must be above every stored id)")
  if not set(m["tombstones"]) <= set(ids.tolist()):
    raise _malformed(path, "tombstones name ids no shard stores")
  live = _liveness(ids, m["tombstones"])
  if int(live.sum()) != m["num_live_docs"]:
    raise _malformed(path, f"num_live_docs={m['num_live_docs']} but {live.sum()} rows are live")
  return live


def _open_once(path: pathlib.Path, m: dict, stored: BankSpec, spec: BankSpec | None,
               verify: bool, mmap: bool) -> MemoryBank:
  if spec is not None:
    _compare_specs(stored, spec, path / MANIFEST)
  mem, disk = _dtypes(stored)
  kh = (stored.num_kv_heads, stored.head_dim)
  load = lambda p, e, dt, shape, mm=mmap: _load_npy(p, e, dt, shape, verify=verify, mmap=mm)

  template = None
  if m["template"] is not None:
    t, files, tdir = m["template"]["length"], m["template"]["files"], path / TEMPLATE
    tokens = np.array(load(tdir / "tokens.npy", files["tokens.npy"], _INT, (t,), False))
    arr = {kind: {l: _from_disk(load(tdir / f"{kind}_L{l}.npy", files[f"{kind}_L{l}.npy"], disk,
                                     (t,) + kh), stored)
                  for l in range(stored.num_layers)} for kind in ("keys", "values")}
    template = Template(tokens=tokens, keys=arr["keys"], values=arr["values"])

  ids, lengths = [], []
  parts = {kind: {l: [] for l in stored.router_layers}
           for kind in ("keys", "values", "routing_keys")}
  for s in m["shards"]:
    sdir, files, n, c = path / SHARDS / s["name"], s["files"], s["num_docs"], s["num_chunks"]
    sid = np.array(load(sdir / "doc_ids.npy", files["doc_ids.npy"], _INT, (n,), False))
    slen = np.array(load(sdir / "lengths.npy", files["lengths.npy"], _INT, (n,), False))
    if (sid < 0).any() or np.unique(sid).size != n:
      raise BankError(f"{sdir / 'doc_ids.npy'}: document ids must be unique and >= 0")
    if (slen < 1).any() or int(_chunk_counts(slen, stored.pooling_size).sum()) != c:
      raise BankError(f"{sdir / 'lengths.npy'}: lengths do not give the shard's {c} chunks")
    ids.append(sid)
    lengths.append(slen)
    for kind in parts:
      for l in stored.router_layers:
        name = f"{kind}_L{l}.npy"
        parts[kind][l].append(_from_disk(load(sdir / name, files[name], disk, (c,) + kh),
                                         stored))

  ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
  lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
  live = _check_ids(m, ids, path / MANIFEST)
  counts = _chunk_counts(lengths, stored.pooling_size)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

  def whole(ps: list[np.ndarray], lazy: bool):
    if not ps:
      return np.zeros((0,) + kh, mem)
    if len(ps) == 1:
      return ps[0]
    return ChunkArray(ps) if lazy else np.concatenate(ps)

  return MemoryBank(
      spec=stored, doc_ids=ids, lengths=lengths, chunk_offset=offsets, chunk_count=counts,
      live=live,
      keys={l: whole(p, mmap) for l, p in parts["keys"].items()},
      values={l: whole(p, mmap) for l, p in parts["values"].items()},
      # Routing keys are scanned whole by every request (and placed on device): one array.
      routing_keys={l: whole(p, False) for l, p in parts["routing_keys"].items()},
      template=template)


def open_bank(path: PathLike, *, spec: BankSpec | None = None, verify: bool = True,
              mmap: bool = True, weights_sha256: str | None = None) -> MemoryBank:
  """Opens the bank at `path` as a `MemoryBank` of host numpy arrays.

  spec: when given, the bank's spec must equal it (else `BankError` naming the fields).
  weights_sha256: when given (`nn.model.weights_fingerprint`), a bank that records other weights
    is refused.
  verify: check every file's sha256 against the manifest (reads the whole bank once). Sizes and
    headers are always checked, so a truncated file is caught either way.
  mmap: memory-map the arrays. Content keys/values of a multi-shard bank are then `ChunkArray`s
    that read only the chunks indexed (see `ContentReader`); routing keys are concatenated in
    memory (a single shard's stay memory-mapped). Without mmap everything is read into memory.
  """
  path = pathlib.Path(path)

  def once(m: dict, stored: BankSpec) -> MemoryBank:
    if spec is not None:  # another config is the plainer message: say it first
      _compare_specs(stored, spec, path / MANIFEST)
    _check_weights(m, weights_sha256, path / MANIFEST)
    return _open_once(path, m, stored, spec, verify, mmap)

  return _snapshot(path, once)


def read_texts(path: PathLike) -> dict[int, DocText]:
  """id -> the original text and title of every live document that has either stored (documents
  appended without them are absent). The texts files are always checksum-verified."""
  path = pathlib.Path(path)

  def once(m: dict, stored: BankSpec) -> dict[int, DocText]:
    ids, texts = [], []
    for s in m["shards"]:
      sdir, files, n = path / SHARDS / s["name"], s["files"], s["num_docs"]
      ids.append(np.array(_load_npy(sdir / "doc_ids.npy", files["doc_ids.npy"], _INT, (n,),
                                    verify=True, mmap=False)))
      texts += _read_texts_file(sdir, files[TEXTS], n) if TEXTS in files else [None] * n
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    live = _check_ids(m, all_ids, path / MANIFEST)
    return {int(i): t for i, t, ok in zip(all_ids.tolist(), texts, live.tolist())
            if ok and t is not None and (t.text, t.title) != (None, None)}

  return _snapshot(path, once)


def _read_texts_file(sdir: pathlib.Path, entry: dict, n: int) -> list[DocText]:
  f = sdir / TEXTS
  try:
    raw = f.read_bytes()
  except FileNotFoundError:
    raise _MissingFile(f"{f}: missing file (listed in the manifest)") from None
  if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
    raise BankError(f"{f}: size or checksum differs from the manifest; the file is corrupt")
  return _parse_texts(raw, n, f)


def _snapshot(path: pathlib.Path, read: Callable[[dict, BankSpec], Any]):
  """`read(manifest, spec)` on a consistent snapshot of the bank, however compactions interleave."""
  m, stored = read_manifest(path)
  for _ in range(_OPEN_ATTEMPTS):
    try:
      return read(m, stored)
    except _MissingFile:
      # A compaction swapped the manifest and removed the shards of the one we were reading:
      # start over from the new manifest (a snapshot). Only a file missing under an unchanged
      # manifest is an error. Generations only grow, so this ends once writes pause.
      newer, stored = read_manifest(path)
      if newer["generation"] == m["generation"]:
        raise
      if newer["generation"] < m["generation"]:
        raise BankError(f"{path / MANIFEST}: generation went back from {m['generation']} to "
                        f"{newer['generation']} while reading (the manifest was replaced by an "
                        "older copy)") from None
      m = newer
  raise BankError(f"{path}: the bank changed {_OPEN_ATTEMPTS} times while being opened; "
                  "try again when its writer pauses")


# --- writing ------------------------------------------------------------------------------------


def _check_encoded(enc: EncodedDocs, spec: BankSpec) -> tuple[np.ndarray, np.ndarray]:
  """Validates stage-1 output against the spec; returns (lengths int64 [m], chunk counts [m])."""
  lengths = np.asarray(enc.lengths)
  if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
    raise BankError(f"EncodedDocs.lengths must be a 1-D integer array, got "
                    f"{lengths.dtype}{list(lengths.shape)}")
  lengths = lengths.astype(np.int64)
  empty = np.flatnonzero(lengths < 1)
  if empty.size:
    raise BankError(f"documents at positions {empty.tolist()} have length "
                    f"{lengths[empty].tolist()}: empty documents have no chunks and cannot be "
                    "stored in a bank")
  counts = _chunk_counts(lengths, spec.pooling_size)
  c = int(counts.sum())
  want = (c, spec.num_kv_heads, spec.head_dim)
  for kind in ("keys", "values", "routing_keys"):
    d = getattr(enc, kind)
    if sorted(d) != sorted(spec.router_layers):
      raise BankError(f"EncodedDocs.{kind} has layers {sorted(d)}, the bank's router layers "
                      f"are {list(spec.router_layers)}")
    for l, a in d.items():
      if tuple(np.shape(a)) != want:
        raise BankError(f"EncodedDocs.{kind}[{l}] has shape {list(np.shape(a))}, expected "
                        f"{list(want)} (chunks = sum(ceil(lengths / {spec.pooling_size})), "
                        "kv heads, head dim)")
  return lengths, counts


def _check_template(tpl: Template, spec: BankSpec) -> int:
  tokens = np.asarray(tpl.tokens)
  if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
    raise BankError(f"Template.tokens must be a 1-D integer array, got "
                    f"{tokens.dtype}{list(tokens.shape)}")
  t = tokens.shape[0]
  want = (t, spec.num_kv_heads, spec.head_dim)
  for kind in ("keys", "values"):
    d = getattr(tpl, kind)
    if sorted(d) != list(range(spec.num_layers)):
      raise BankError(f"Template.{kind} must hold every layer 0..{spec.num_layers - 1}, "
                      f"has {sorted(d)}")
    for l, a in d.items():
      if tuple(np.shape(a)) != want:
        raise BankError(f"Template.{kind}[{l}] has shape {list(np.shape(a))}, expected "
                        f"{list(want)}")
  return t


def _template_arrays(tpl: Template, spec: BankSpec) -> dict[str, np.ndarray]:
  out = {"tokens.npy": np.ascontiguousarray(np.asarray(tpl.tokens).astype(_INT))}
  for l in range(spec.num_layers):
    out[f"keys_L{l}.npy"] = _to_disk(tpl.keys[l], spec, f"Template.keys[{l}]")
    out[f"values_L{l}.npy"] = _to_disk(tpl.values[l], spec, f"Template.values[{l}]")
  return out


class BankWriter:
  """Creates or reopens (resumes) the bank at `path`; the one writer of that bank while open.

  `append` commits one shard per call; `delete`, `replace` and `compact` change the memory
  without re-encoding the other documents. Every call is atomic: after a crash the bank holds
  either all of a call's effect or none of it. Use as a context manager (or call `close`).

  spec: required to create a bank; when reopening, it must equal the stored spec (None: take the
    stored one). template: stored when the bank is created; when reopening, it must be identical
    to the stored template (None: keep it). weights_sha256: the encoding model's
    `nn.model.weights_fingerprint`, recorded when the bank is created; when reopening, a bank
    that records other weights is refused.
  """

  def __init__(self, path: PathLike, spec: BankSpec | None = None, *,
               template: Template | None = None, weights_sha256: str | None = None):
    self.path = pathlib.Path(path)
    self._lock_fd = None
    self._closed = False
    self.path.mkdir(parents=True, exist_ok=True)
    self._lock()
    try:
      if (self.path / MANIFEST).exists():
        self._manifest, self.spec = read_manifest(self.path)
        if spec is not None:
          _compare_specs(self.spec, spec, self.path / MANIFEST)
        _check_weights(self._manifest, weights_sha256, self.path / MANIFEST)
        self._shard_ids = [self._read_ids(s) for s in self._manifest["shards"]]
        _check_ids(self._manifest, self._all_ids(), self.path / MANIFEST)
        self._cleanup()  # only after the manifest proved consistent: it decides what is garbage
        if template is not None:
          self._check_same_template(template)
      else:
        if spec is None:
          raise BankError(f"{self.path}: no bank here ({MANIFEST} missing) and no spec given "
                          "to create one")
        _check_spec_values(spec)
        self.spec = BankSpec(**{**dataclasses.asdict(spec),
                                "router_layers": tuple(int(x) for x in spec.router_layers)})
        self._check_empty_for_create()
        self._cleanup(creating=True)
        self._shard_ids = []
        self._manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": _spec_to_json(self.spec),
            "generation": 0, "next_shard": 0, "next_doc_id": 0, "num_docs": 0,
            "num_live_docs": 0, "num_chunks": 0, "tombstones": [], "template": None,
            "shards": [], "weights_sha256": weights_sha256}
        if template is not None:
          self._manifest["template"] = self._write_template(template)
        self._write_manifest(self._manifest)
    except BaseException:
      self.close()
      raise

  # --- state ---

  @property
  def num_committed_docs(self) -> int:
    """Document rows in committed shards (all appended documents until a compaction drops dead
    ones); a resuming encoder that appends documents in order continues from here."""
    return self._manifest["num_docs"]

  @property
  def num_live_docs(self) -> int:
    return self._manifest["num_live_docs"]

  @property
  def next_doc_id(self) -> int:
    return self._manifest["next_doc_id"]

  @property
  def num_shards(self) -> int:
    return len(self._manifest["shards"])

  def _all_ids(self) -> np.ndarray:
    return np.concatenate(self._shard_ids) if self._shard_ids else np.zeros(0, np.int64)

  def _live(self) -> np.ndarray:
    return _liveness(self._all_ids(), self._manifest["tombstones"])

  @property
  def live_doc_ids(self) -> np.ndarray:
    """[live] ids of the live documents, in bank row order."""
    return self._all_ids()[self._live()]

  # --- lifecycle ---

  def _lock(self) -> None:
    if fcntl is None:  # pragma: no cover
      return
    fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise BankError(f"{self.path}: another writer has this bank open") from None
    self._lock_fd = fd

  def close(self) -> None:
    self._closed = True
    if self._lock_fd is not None:
      os.close(self._lock_fd)  # releases the flock
      self._lock_fd = None

  def __enter__(self) -> "BankWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check_open(self) -> None:
    if self._closed:
      raise BankError(f"{self.path}: this BankWriter is closed")

  def _check_empty_for_create(self) -> None:
    ours = lambda n: n in (SHARDS, TEMPLATE, _LOCK) or n.startswith((_TMP, _MANIFEST_TMP))
    other = sorted(n for n in os.listdir(self.path) if not ours(n))
    if other:
      raise BankError(f"{self.path}: cannot create a bank in a non-empty directory (found "
                      f"{other[:5]})")

  def _cleanup(self, creating: bool = False) -> None:
    """Removes what a killed writer left: temp files/dirs and shards no manifest lists."""
    for n in os.listdir(self.path):
      p = self.path / n
      if n.startswith(_TMP) or n.startswith(_MANIFEST_TMP):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    listed = set() if creating else {s["name"] for s in self._manifest["shards"]}
    sdir = self.path / SHARDS
    if sdir.is_dir():
      for n in os.listdir(sdir):
        if _SHARD_NAME.match(n) and n not in listed and (sdir / n).is_dir():
          shutil.rmtree(sdir / n)
    if (creating or self._manifest["template"] is None) and (self.path / TEMPLATE).is_dir():
      shutil.rmtree(self.path / TEMPLATE)

  def _read_ids(self, s: dict) -> np.ndarray:
    sdir = self.path / SHARDS / s["name"]
    return np.array(_load_npy(sdir / "doc_ids.npy", s["files"]["doc_ids.npy"], _INT,
                              (s["num_docs"],), verify=True, mmap=False))

  # --- low-level commits ---

  def _write_manifest(self, m: dict) -> None:
    m = dict(m, generation=self._manifest["generation"] + 1)
    ids = self._all_ids()
    m["num_live_docs"] = int(_liveness(ids, m["tombstones"]).sum())
    m["checksum"] = _manifest_digest(m)
    blob = (json.dumps(m, indent=1, sort_keys=True) + "\n").encode()
    tmp = self.path / f"{_MANIFEST_TMP}{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "xb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    _publish_manifest(tmp, self.path / MANIFEST)
    self._manifest = m

  def _write_dir(self, kind: str, files: dict[str, tuple[np.dtype, tuple, Any] | bytes],
                 target: pathlib.Path) -> dict[str, dict]:
    """Writes {name: (dtype, shape, blocks) for a .npy, or raw bytes} into a temp dir, fsyncs,
    renames it to `target`."""
    if target.parent.name == SHARDS and any(s["name"] == target.name
                                            for s in self._manifest["shards"]):
      raise BankError(f"{target}: the manifest lists this shard; refusing to overwrite committed "
                      "data (is the manifest's next_shard too low?)")
    tmp = self.path / _tmp_name(kind)
    tmp.mkdir()
    try:
      entries = {name: (_write_raw_file(tmp / name, v) if isinstance(v, bytes)
                        else _write_npy_file(tmp / name, *v)) for name, v in files.items()}
      _fsync_dir(tmp)
      target.parent.mkdir(exist_ok=True)
      _publish_dir(tmp, target)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return entries

  def _write_template(self, tpl: Template) -> dict:
    t = _check_template(tpl, self.spec)
    arrays = _template_arrays(tpl, self.spec)
    files = {n: (a.dtype, a.shape, _row_blocks(a)) for n, a in arrays.items()}
    return {"length": t, "files": self._write_dir("template", files, self.path / TEMPLATE)}

  def _check_same_template(self, tpl: Template) -> None:
    stored = self._manifest["template"]
    if stored is None:
      raise BankError(f"{self.path}: the bank has no template; a template is only stored "
                      "when a bank is created")
    _check_template(tpl, self.spec)
    for name, a in _template_arrays(tpl, self.spec).items():
      if _npy_entry(a) != stored["files"][name]:
        raise BankError(f"{self.path / TEMPLATE / name}: differs from the given template "
                        "(a bank keeps the template it was created with)")

  def _next_shard_name(self) -> str:
    return f"s{self._manifest['next_shard']:06d}"

  def _commit_shard(self, ids: np.ndarray, lengths: np.ndarray,
                    arrays: dict[str, tuple[tuple, Any]], tombstones: list[int],
                    source: InputRecord | None = None,
                    texts: list[DocText] | None = None) -> None:
    """Writes one shard (arrays: name -> (shape, blocks) in the disk dtype) and commits it
    (with `source`'s record, when given, advanced past these documents in the same write)."""
    disk = _dtypes(self.spec)[1]
    c = int(_chunk_counts(lengths, self.spec.pooling_size).sum())
    files = {"doc_ids.npy": (_INT, ids.shape, [ids.astype(_INT)]),
             "lengths.npy": (_INT, lengths.shape, [lengths.astype(_INT)])}
    files.update({n: (disk, shape, blocks) for n, (shape, blocks) in arrays.items()})
    if texts is not None:
      files[TEXTS] = _texts_blob(texts)
    name = self._next_shard_name()
    entries = self._write_dir(f"shard-{name}", files, self.path / SHARDS / name)
    m = dict(self._manifest)
    m["shards"] = m["shards"] + [{"name": name, "num_docs": int(ids.size), "num_chunks": c,
                                  "files": entries, "generation": m["generation"] + 1}]
    m["next_shard"] += 1
    m["num_docs"] += int(ids.size)
    m["num_chunks"] += c
    m["next_doc_id"] = max(m["next_doc_id"], int(ids.max()) + 1)
    m["tombstones"] = tombstones
    if source is not None:
      done = dataclasses.replace(source, committed=source.committed + int(ids.size))
      m["inputs"] = [r for r in m.get("inputs", []) if r["sha256"] != source.sha256] + [
          dataclasses.asdict(done)]
    self._shard_ids.append(ids)
    try:
      self._write_manifest(m)
    except BaseException:
      self._shard_ids.pop()
      raise

  def _resolve_ids(self, doc_ids, m: int) -> np.ndarray:
    if doc_ids is None:
      return np.arange(self.next_doc_id, self.next_doc_id + m, dtype=np.int64)
    ids = np.asarray(doc_ids)
    if ids.shape != (m,) or (ids.size and ids.dtype.kind not in "iu"):
      raise BankError(f"doc_ids must be {m} integers, got {ids.dtype}{list(ids.shape)}")
    ids = ids.astype(np.int64)
    if (ids < 0).any():
      raise BankError(f"document ids must be >= 0, got {ids[ids < 0].tolist()}")
    if np.unique(ids).size != m:
      raise BankError("doc_ids repeat an id within one call")
    return ids

  # --- encode inputs ---

  @property
  def inputs(self) -> list[InputRecord]:
    """The inputs resumable encodes have committed documents from, oldest first."""
    return [InputRecord(**r) for r in self._manifest.get("inputs", [])]

  def input_record(self, sha256: str) -> InputRecord | None:
    """The record of the input with this fingerprint, or None if no encode committed from it."""
    return next((r for r in self.inputs if r.sha256 == sha256), None)

  def new_input(self, sha256: str, num_docs: int, first_id: int | None = None) -> InputRecord:
    """A record for an input not seen before (stored with its first committed shard); its ids
    start at `first_id`, by default `next_doc_id`, and never below it."""
    if not _SHA256.match(sha256) or self.input_record(sha256) is not None or num_docs < 1:
      raise BankError(f"a new input needs a fresh sha256 fingerprint and >= 1 document, got "
                      f"{sha256!r} with {num_docs}")
    first_id = self.next_doc_id if first_id is None else int(first_id)
    if first_id < self.next_doc_id:
      raise BankError(f"first_id={first_id} is below the bank's next_doc_id {self.next_doc_id}")
    return InputRecord(sha256=sha256, num_docs=num_docs, first_id=first_id)

  def append_input(self, enc: EncodedDocs, record: InputRecord, *, doc_ids=None, texts=None,
                   titles=None) -> InputRecord:
    """Appends the input's next `len(enc.lengths)` documents and advances its record in the same
    commit; returns the advanced record. Their ids are `first_id + committed + i`, or `doc_ids`
    for an input that names its documents' ids itself (they are part of its fingerprint)."""
    self._check_open()
    stored = self.input_record(record.sha256)
    if (stored or dataclasses.replace(record, committed=0)) != record:
      raise BankError(f"{self.path}: the record of input {record.sha256[:12]} is stale or "
                      "altered (resume from `input_record`)")
    lengths, _ = _check_encoded(enc, self.spec)
    if record.committed + lengths.size > record.num_docs:
      raise BankError(f"appending {lengths.size} documents would pass the input's "
                      f"{record.num_docs}")
    start = record.first_id + record.committed
    ids = (np.arange(start, start + lengths.size, dtype=np.int64) if doc_ids is None
           else self._resolve_ids(doc_ids, lengths.size))
    clash = np.intersect1d(ids, self.live_doc_ids)
    if clash.size:
      raise BankError(f"{self.path}: ids {clash[:10].tolist()} of this input are already taken "
                      "by other documents; the input cannot be resumed here")
    docs = _check_texts(texts, titles, lengths.size)
    if lengths.size:
      self._append(enc, lengths, ids,
                   sorted(set(self._manifest["tombstones"]) - set(ids.tolist())), record, docs)
    return dataclasses.replace(record, committed=record.committed + int(lengths.size))

  # --- public operations ---

  def append(self, enc: EncodedDocs, doc_ids=None, *, texts=None, titles=None) -> np.ndarray:
    """Stores `enc` as one new shard, without touching other documents; returns their ids.

    doc_ids: None assigns `next_doc_id, next_doc_id + 1, ...`; explicit ids must not be live
    (use `replace`); an id deleted before is allowed and becomes live again.
    texts, titles: optional, one string (or None) per document: kept with the shard
    (`read_texts`), for Memory Interleave and for showing what a question retrieved.
    """
    self._check_open()
    lengths, _ = _check_encoded(enc, self.spec)
    ids = self._resolve_ids(doc_ids, lengths.size)
    docs = _check_texts(texts, titles, lengths.size)
    if not ids.size:
      return ids
    clash = np.intersect1d(ids, self.live_doc_ids)
    if clash.size:
      raise BankError(f"document ids {clash.tolist()} are already live in the bank (use "
                      "replace to change a document)")
    self._append(enc, lengths, ids, sorted(set(self._manifest["tombstones"]) - set(ids.tolist())),
                 texts=docs)
    return ids

  def replace(self, enc: EncodedDocs, doc_ids, *, texts=None, titles=None) -> np.ndarray:
    """Replaces live documents by new encodings under the same ids (the old rows die, the new
    ones are appended: a replaced document moves to the end of the bank order)."""
    self._check_open()
    lengths, _ = _check_encoded(enc, self.spec)
    if doc_ids is None:
      raise BankError("replace needs the ids of the documents to replace")
    ids = self._resolve_ids(doc_ids, lengths.size)
    docs = _check_texts(texts, titles, lengths.size)
    self._require_live(ids)
    if ids.size:
      self._append(enc, lengths, ids, list(self._manifest["tombstones"]), texts=docs)
    return ids

  def _append(self, enc: EncodedDocs, lengths: np.ndarray, ids: np.ndarray,
              tombstones: list[int], source: InputRecord | None = None,
              texts: list[DocText] | None = None) -> None:
    arrays = {}
    for l in self.spec.router_layers:
      for kind in ("keys", "values", "routing_keys"):
        a = _to_disk(getattr(enc, kind)[l], self.spec, f"EncodedDocs.{kind}[{l}]")
        arrays[f"{kind}_L{l}.npy"] = (a.shape, _row_blocks(a))
    self._commit_shard(ids, lengths, arrays, tombstones, source, texts)

  def _require_live(self, ids: np.ndarray) -> None:
    missing = np.setdiff1d(ids, self.live_doc_ids)
    if missing.size:
      raise UnknownDocumentError(f"{self.path}: document ids {missing.tolist()} are not live in "
                                 "the bank (never added, or deleted)")

  def delete(self, doc_ids) -> None:
    """Deletes live documents by id: they stop being routable as soon as this returns."""
    self._check_open()
    ids = np.asarray(doc_ids).reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
      raise BankError(f"doc_ids must be integers, got {ids.dtype}")
    ids = np.unique(ids.astype(np.int64))
    self._require_live(ids)
    if ids.size:
      m = dict(self._manifest)
      m["tombstones"] = sorted(set(m["tombstones"]) | set(ids.tolist()))
      self._write_manifest(m)

  def compact(self, *, max_shard_docs: int | None = None, verify: bool = True) -> int:
    """Rewrites the live documents (bank order, same ids) into fresh shards of at most
    `max_shard_docs` documents (None: one shard), then drops the old shards. Returns the number
    of dead rows removed. Nothing happens when there is nothing to reclaim or merge.

    verify: check the source files' checksums first, so compaction never launders corruption.
    """
    self._check_open()
    if max_shard_docs is not None and max_shard_docs < 1:
      raise BankError(f"max_shard_docs={max_shard_docs} must be >= 1")
    old = list(self._manifest["shards"])
    live = self._live()
    n = int(live.size)
    step = max_shard_docs or max(1, n)
    # Already compact: every row live and the shards exactly the groups a rewrite would make.
    if live.all() and [s["num_docs"] for s in old] == [min(step, n - i)
                                                       for i in range(0, n, step)]:
      return 0
    _, disk = _dtypes(self.spec)
    kh = (self.spec.num_kv_heads, self.spec.head_dim)
    # Source rows: per old shard its memory-mapped arrays, lengths and chunk offsets.
    src = []
    for s in old:
      sdir, files = self.path / SHARDS / s["name"], s["files"]
      ld = lambda n, dt, shape: _load_npy(sdir / n, files[n], dt, shape, verify=verify, mmap=True)
      lengths = np.array(ld("lengths.npy", _INT, (s["num_docs"],)))
      counts = _chunk_counts(lengths, self.spec.pooling_size)
      arr = {n: ld(n, disk, (s["num_chunks"],) + kh) for n in _shard_files(self.spec)[2:]}
      texts = (_read_texts_file(sdir, files[TEXTS], s["num_docs"]) if TEXTS in files else None)
      src.append((lengths, np.concatenate([[0], np.cumsum(counts)]), arr, texts))
    rows = [(i, r) for i, ids in enumerate(self._shard_ids) for r in range(ids.size)]
    live_rows = [rows[g] for g in np.flatnonzero(live)]
    step = max_shard_docs or max(1, len(live_rows))
    generation = self._manifest["generation"] + 1
    groups = [live_rows[i:i + step] for i in range(0, len(live_rows), step)]

    new_shards, new_ids, all_ids = [], [], self._all_ids()
    m = dict(self._manifest)
    try:
      for group in groups:
        ids = np.array([self._shard_ids[i][r] for i, r in group], np.int64)
        lengths = np.array([src[i][0][r] for i, r in group], np.int64)
        runs = _chunk_runs(group, src)
        c = sum(b - a for _, a, b in runs)
        arrays = {n: ((c,) + kh, _copy_blocks(runs, src, n)) for n in _shard_files(self.spec)[2:]}
        name = f"s{m['next_shard']:06d}"
        files = {"doc_ids.npy": (_INT, ids.shape, [ids]),
                 "lengths.npy": (_INT, lengths.shape, [lengths])}
        files.update({n: (disk, shape, blocks) for n, (shape, blocks) in arrays.items()})
        if any(src[i][3] is not None for i, _ in group):
          files[TEXTS] = _texts_blob([src[i][3][r] if src[i][3] is not None else DocText(None)
                                      for i, r in group])
        entries = self._write_dir(f"compact-{name}", files, self.path / SHARDS / name)
        new_shards.append({"name": name, "num_docs": int(ids.size), "num_chunks": c,
                           "files": entries, "generation": generation})
        new_ids.append(ids)
        m["next_shard"] += 1
      m.update(shards=new_shards, tombstones=[],
               num_docs=sum(s["num_docs"] for s in new_shards),
               num_chunks=sum(s["num_chunks"] for s in new_shards))
      self._shard_ids = new_ids
      self._write_manifest(m)
    except BaseException:
      self._shard_ids = [all_ids[a:b] for a, b in _bounds(old)]
      for s in new_shards:
        shutil.rmtree(self.path / SHARDS / s["name"], ignore_errors=True)
      raise
    for s in old:  # no longer listed: safe to remove (readers keep any open memory maps)
      shutil.rmtree(self.path / SHARDS / s["name"], ignore_errors=True)
    return int((~live).sum())


def _bounds(shards: list[dict]) -> list[tuple[int, int]]:
  ends = np.cumsum([0] + [s["num_docs"] for s in shards])
  return list(zip(ends[:-1].tolist(), ends[1:].tolist()))


def _chunk_runs(group: list[tuple[int, int]], src) -> list[tuple[int, int, int]]:
  """(source shard, first chunk, end chunk) runs covering the group's rows, merged when
  contiguous."""
  runs: list[list[int]] = []
  for i, r in group:
    a, b = int(src[i][1][r]), int(src[i][1][r + 1])
    if runs and runs[-1][0] == i and runs[-1][2] == a:
      runs[-1][2] = b
    else:
      runs.append([i, a, b])
  return [tuple(x) for x in runs]


def _copy_blocks(runs, src, name: str) -> Iterator[np.ndarray]:
  for i, a, b in runs:
    yield from _row_blocks(src[i][2][name][a:b])


# --- convenience --------------------------------------------------------------------------------


def add_documents(path: PathLike, enc: EncodedDocs, doc_ids=None, *, texts=None,
                  titles=None) -> np.ndarray:
  """Appends documents to an existing bank (one shard); returns their ids."""
  with BankWriter(path) as w:
    return w.append(enc, doc_ids, texts=texts, titles=titles)


def delete_documents(path: PathLike, doc_ids) -> None:
  with BankWriter(path) as w:
    w.delete(doc_ids)


def replace_documents(path: PathLike, enc: EncodedDocs, doc_ids, *, texts=None,
                      titles=None) -> np.ndarray:
  with BankWriter(path) as w:
    return w.replace(enc, doc_ids, texts=texts, titles=titles)


def compact(path: PathLike, *, max_shard_docs: int | None = None, verify: bool = True) -> int:
  """Rewrites the bank's live documents into fresh shards (crash-safe); returns rows dropped."""
  with BankWriter(path) as w:
    return w.compact(max_shard_docs=max_shard_docs, verify=verify)


def save_bank(path: PathLike, bank: MemoryBank) -> np.ndarray:
  """Writes the live documents of an in-memory bank as a new bank (one shard); returns ids."""
  rows = np.flatnonzero(bank.live)
  chunks = ContentReader(bank).doc_chunks(rows)
  enc = EncodedDocs(
      lengths=bank.lengths[rows],
      keys={l: np.asarray(a[chunks]) for l, a in bank.keys.items()},
      values={l: np.asarray(a[chunks]) for l, a in bank.values.items()},
      routing_keys={l: np.asarray(a[chunks]) for l, a in bank.routing_keys.items()})
  with BankWriter(path, bank.spec, template=bank.template) as w:
    return w.append(enc, bank.doc_ids[rows]) if rows.size else rows.astype(np.int64)
