"""`msa-jax` command-line tool: documents in, answers out, and the three stages underneath.

  msa-jax encode [--checkpoint DIR] --documents PATH --bank DIR [--split MODE] [--append]
  msa-jax ask [--checkpoint DIR] --bank DIR [QUESTION ...] [--questions FILE] [--json]
  msa-jax bank info|add|delete|replace|compact BANK ...
  msa-jax generate [--checkpoint DIR] --bank DIR --batch Q.npz --max-new-tokens N --output OUT.npz
  msa-jax forward [--checkpoint DIR] --batch IN.npz --output OUT.npz [--reference REF.npz]

`--checkpoint` defaults to the shipped NIAH demo model; `niah` and `multihop` name the shipped
models. Documents are text (`.jsonl` with {"text", optional "id", "title"}, `.txt`, `.md`, or a
directory of them; `--split file|paragraph|chars:N`) or token arrays (`.npz`). `forward` runs the
training-path forward in float32 on a SPEC §13 batch and writes `logits`, `doc_scores_L{l}`,
`selected_docs_L{l}` (and the losses when the batch has labels); with `--reference`, it also
prints the largest difference from another run's outputs of the same names.

Exit status: 0 success, 2 bad input (one `error:` line naming it), 1 an internal error.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np


def _write_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class InputError(ValueError):
  """A bad command-line input (file or value), reported with status 2."""


def _check_output(path: str) -> pathlib.Path:
  """--output as a path, refused up front (before any compute) when it cannot be written: it is
  a directory, or its nearest existing ancestor is not a writable directory."""
  p = pathlib.Path(path)
  if p.is_dir():
    raise InputError(f"--output {path} is a directory")
  parent = p.parent
  while not parent.exists():  # missing directories are created when writing
    parent = parent.parent
  if not parent.is_dir():
    raise InputError(f"--output {path}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise InputError(f"--output {path}: {parent} is not writable")
  return p


def _load_npz(path, what: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file; InputError naming the file when it is not a readable one."""
  import zipfile
  import zlib
  try:
    f = np.load(path, allow_pickle=False)
    if isinstance(f, np.lib.npyio.NpzFile):
      with f:
        return dict(f)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise InputError(f"cannot read {what} {path}: {e or type(e).__name__}") from None
  raise InputError(f"cannot read {what} {path}: not an .npz archive (np.savez writes one)")


def _checked(parse, ok, need: str):
  """An argparse `type` that parses a number and checks it (status 2 with `need` otherwise)."""
  def convert(text: str):
    try:
      value = parse(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not {'an integer' if parse is int else 'a number'}") from None
    if not ok(value):  # comparisons with nan are false: nan is refused too
      raise argparse.ArgumentTypeError(f"{text} {need}")
    return value
  return convert


_positive_int = _checked(int, lambda v: v >= 1, "must be >= 1")
_seed = _checked(int, lambda v: -2 ** 63 <= v < 2 ** 63, "does not fit in 64 bits")
_temperature = _checked(float, lambda v: np.isfinite(v) and v >= 0,
                        "must be a finite number >= 0 (0 = greedy)")
_top_p = _checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]")


def forward_outputs(checkpoint: str, batch_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays `msa-jax forward` writes, as numpy (names exactly as in SPEC §13)."""
  from msa_jax import forward as fw  # deferred: keeps `--help` fast
  from msa_jax.interop import hf
  from msa_jax.nn.model import from_params

  cfg, params = hf.load_checkpoint(checkpoint)
  params = _to_float32(params)
  batch = fw.Batch.from_arrays(batch_arrays, vocab_size=cfg.vocab_size)
  out = fw.run(from_params(cfg, params), batch)
  arrays = {"logits": np.asarray(out.logits, np.float32)}
  for l in sorted(out.doc_scores):
    arrays[f"doc_scores_L{l}"] = np.asarray(out.doc_scores[l], np.float32)
    arrays[f"selected_docs_L{l}"] = np.asarray(out.selected[l], np.int64)
  if out.losses is not None:
    for name in ("loss", "lm_loss", "aux_loss", "answer_loss", "reconstruction_loss"):
      arrays[name] = np.asarray(getattr(out.losses, name), np.float32)
  return arrays


def _to_float32(params):
  from msa_jax.text_memory import float32_params
  return float32_params(params)


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            valid: np.ndarray) -> list[tuple[str, str]]:
  """(name, verdict) for every array present in both; logits are compared on valid tokens."""
  rows = []
  for name in sorted(set(ours) & set(reference)):
    a, b = ours[name], reference[name]
    if a.shape != b.shape:
      rows.append((name, f"shape {a.shape} vs {b.shape}"))
    elif name.startswith("selected_docs"):
      rows.append((name, "identical" if np.array_equal(a, b) else f"differ: {a.tolist()} vs {b.tolist()}"))
    elif not np.issubdtype(b.dtype, np.number):
      rows.append((name, f"reference dtype {b.dtype} is not numeric"))
    else:
      if name == "logits":
        a, b = a[valid], b[valid]
      same_inf = np.array_equal(np.isinf(a), np.isinf(b))
      fin = np.isfinite(a) & np.isfinite(b)
      diff = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
      rows.append((name, f"max|diff| {diff:.3g}" + ("" if same_inf else " (inf pattern differs)")))
  return rows


def _cmd_forward(args) -> int:
  from msa_jax.config import ConfigError
  from msa_jax.forward import BatchError
  from msa_jax.interop.hf import CheckpointError

  try:  # every input is checked before the model is loaded
    output = _check_output(args.output)
    batch_arrays = _load_npz(args.batch, "batch")
    reference = _load_npz(args.reference, "--reference") if args.reference else None
    arrays = forward_outputs(args.checkpoint, batch_arrays)
  except (ConfigError, CheckpointError, BatchError, InputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _write_npz_atomic(output, arrays)
  b, t, v = arrays["logits"].shape
  print(f"wrote {args.output}: logits [{b}, {t}, {v}]")
  for name in sorted(arrays):
    if name.startswith("selected_docs"):
      print(f"  {name}: {arrays[name].tolist()}")
    elif arrays[name].ndim == 0:
      print(f"  {name}: {float(arrays[name]):.6f}")
  if reference is not None:
    valid = batch_arrays["attention_mask"].astype(bool)
    print(f"against {args.reference}:")
    for name, verdict in compare(arrays, reference, valid):
      print(f"  {name}: {verdict}")
  return 0


def _load_model(checkpoint: str | None):
  from msa_jax.interop import hf
  from msa_jax.nn.model import from_params
  from msa_jax.text_memory import checkpoint_dir
  cfg, params = hf.load_checkpoint(checkpoint_dir(checkpoint))
  return from_params(cfg, _to_float32(params))


def _read_token_documents(path: str, vocab_size: int):
  """(tokens [M, Lmax] -1 padded, lengths [M], template or None) from an .npz."""
  from msa_jax.engine import encode
  p = pathlib.Path(path)
  f = _load_npz(p, "documents")
  if "tokens" not in f or "lengths" not in f:
    raise ValueError(f"{p} must hold tokens [M, Lmax] and lengths [M] (optional template [t])")
  encode.check_documents(f["tokens"], f["lengths"], vocab_size)
  return f["tokens"], f["lengths"], f.get("template")


def _cmd_encode(args) -> int:
  from msa_jax.engine import encode
  from msa_jax.memory.store import BankError

  if pathlib.Path(args.documents).suffix.lower() != ".npz":
    return _encode_text(args, append=args.append)
  try:
    model = _load_model(args.checkpoint)
    tokens, lengths, template = _read_token_documents(args.documents, model.cfg.vocab_size)
    total = encode.Progress(len(lengths), int(np.sum(lengths)))
    done = encode.encode_to_bank(model, tokens, lengths, args.bank, template=template,
                                 dtype=args.dtype, shard_docs=args.shard_docs,
                                 append=args.append, progress=total)
  except (ValueError, BankError, OSError) as e:
    return _error(e)
  _report_encode(args.bank, range(done.first_id, done.first_id + done.num_docs),
                 done.resumed_from, done.bank_docs)
  return 0


def _cmd_generate(args) -> int:
  import jax

  from msa_jax.engine import prefill
  from msa_jax.engine.run import BankRunner, ContentPath
  from msa_jax.engine.sampling import Sampling
  from msa_jax.memory.bank import BankSpec
  from msa_jax.memory.store import BankError, open_bank, read_manifest
  from msa_jax.nn.model import weights_fingerprint

  try:  # files are checked before the model is loaded
    output = _check_output(args.output)
    batch = _load_npz(args.batch, "batch")
    model = _load_model(args.checkpoint)
    vocab, context = model.cfg.vocab_size, model.cfg.max_position_embeddings
    if args.max_new_tokens > context:  # the decode cache is preallocated for every new token
      raise InputError(f"--max-new-tokens {args.max_new_tokens} is more than the model's "
                       f"{context} positions")
    for t in args.stop_token:
      if not 0 <= t < vocab:
        raise InputError(f"--stop-token {t} is outside the vocabulary [0, {vocab})")
    _, stored = read_manifest(args.bank)
    bank = open_bank(args.bank, spec=BankSpec.for_model(model.cfg, stored.dtype),
                     weights_sha256=weights_fingerprint(model))
    request = prefill.Request.from_arrays(batch, vocab_size=vocab)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    runner = BankRunner(model, bank, content=ContentPath(args.content) if args.content else None)
  except (ValueError, BankError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  gen = runner.generate(request, args.max_new_tokens, sampling=sampling,
                        stop_tokens=tuple(args.stop_token), key=jax.random.key(args.seed))
  arrays = {"stage2_logits": np.asarray(gen.prefill.logits, np.float32),
            "decode_tokens": np.asarray(gen.tokens, np.int64),
            "decode_logits": np.asarray(gen.logits, np.float32)}
  for l, routed in sorted(gen.prefill.routed.items()):
    arrays[f"selected_docs_L{l}"] = np.asarray(routed.doc_ids, np.int64)
    print(f"  selected_docs_L{l}: {arrays[f'selected_docs_L{l}'].tolist()}")
  _write_npz_atomic(output, arrays)
  print(f"wrote {args.output}: decode_tokens {arrays['decode_tokens'].tolist()}")
  return 0


def _error(e: Exception) -> int:
  print(f"error: {e}", file=sys.stderr)
  return 2


def _memory(args):
  from msa_jax.text_memory import TextMemory
  return TextMemory.open(args.bank, args.checkpoint, tokenizer=getattr(args, "tokenizer", None),
                         dtype=getattr(args, "dtype", "float32"),
                         shard_docs=getattr(args, "shard_docs", 1024))


def _encode_text(args, *, append: bool) -> int:
  from msa_jax.memory.store import BankError
  try:
    mem = _memory(args)
    done = mem.add_path(args.documents, args.split, append=append, log=True)
  except (ValueError, BankError, OSError) as e:
    return _error(e)
  _report_encode(args.bank, done.ids, done.resumed_from, done.live_docs)
  return 0


def _report_encode(bank: str, ids, resumed_from: int, live: int) -> None:
  n = len(ids)
  span = f"id {ids[0]}" if n == 1 else f"ids {ids[0]}..{ids[-1]}"
  if resumed_from == n:
    print(f"bank {bank}: already holds all {_count(n, 'document')} of this input ({span}); "
          f"nothing to do ({_count(live, 'live document')})")
  else:
    resumed = f", resumed after {resumed_from}" if resumed_from else ""
    print(f"bank {bank}: encoded {_count(n - resumed_from, 'document')}{resumed} ({span}); "
          f"{_count(live, 'live document')}")


def _count(n: int, what: str) -> str:
  return f"{n} {what}{'' if n == 1 else 's'}"


def _read_questions(args) -> list[str]:
  qs = list(args.question)
  if args.questions:
    try:
      text = (sys.stdin.read() if args.questions == "-"
              else pathlib.Path(args.questions).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
      raise InputError(f"cannot read --questions {args.questions}: {e}") from None
    qs += [l.strip() for l in text.splitlines() if l.strip()]
  if not qs:
    raise InputError("no question given (arguments or --questions FILE)")
  return qs


_SHOWN = 5  # documents printed per round (all of them with --json)


def _cmd_ask(args) -> int:
  import json

  from msa_jax.data.documents import describe, TextDoc
  from msa_jax.memory.store import BankError
  from msa_jax.text_memory import Protocol

  try:
    questions = _read_questions(args)
    mem = _memory(args)
    default = mem.m.protocol
    protocol = Protocol(args.naming or default.naming, args.max_rounds or default.max_rounds,
                        default.router_docs)
    answers = mem.ask(questions, protocol=protocol, max_new_tokens=args.max_new_tokens)
  except (ValueError, BankError, OSError) as e:
    return _error(e)
  for a in answers:
    if args.json:
      print(json.dumps(a.to_json(), ensure_ascii=False))
      continue
    print(f"Q: {a.question}\nA: {a.answer}")
    for r, rnd in enumerate(a.rounds, 1):
      print(f"  round {r}: {_count(len(rnd.documents), 'document')} routed, best first")
      for d in rnd.documents[:_SHOWN]:
        shown = describe(TextDoc(d.text or "", d.title)) if (d.text or d.title) else ""
        print(f"    {'*' if d.appended else ' '} [{d.id}] {d.score:.3f}  {shown}")
      if len(rnd.documents) > _SHOWN:
        print(f"      ... {len(rnd.documents) - _SHOWN} more (--json lists them all)")
    print(f"  latency {a.latency_s:.3f} s  (* = text appended to the context)\n")
  return 0


def _cmd_bank(args) -> int:
  import json

  from msa_jax.data.documents import read_documents
  from msa_jax.memory import store
  from msa_jax.text_memory import bank_info

  try:
    if args.action == "info":
      info = bank_info(args.bank)
      if args.json:
        print(json.dumps(info))
      else:
        b = info["bytes"]
        print(f"bank {info['path']}: {info['live_docs']} live documents ({info['stored_docs']} "
              f"stored), {info['chunks']} chunks in {info['shards']} shards, generation "
              f"{info['generation']}\n  bytes: routing keys {b['routing_keys']:,} (device), "
              f"content K/V {b['content_kv']:,} (host/disk), texts {b['texts']:,}, other "
              f"{b['other']:,}\n  model: config {info['model']['config_fingerprint']}, weights "
              f"{(info['model']['weights_sha256'] or 'not recorded')[:16]}, router layers "
              f"{info['model']['router_layers']}, {info['model']['dtype']}")
      return 0
    if args.action == "add":
      return _encode_text(args, append=True)
    if args.action == "delete":
      store.delete_documents(args.bank, args.ids)
      print(f"bank {args.bank}: deleted {len(set(args.ids))} documents")
    elif args.action == "replace":
      mem = _memory(args)
      ids = mem.replace(read_documents(args.documents, None))
      print(f"bank {args.bank}: replaced {len(ids)} documents")
    else:
      removed = store.compact(args.bank, max_shard_docs=args.max_shard_docs)
      print(f"bank {args.bank}: compacted, {removed} deleted rows removed")
  except (ValueError, store.BankError, OSError) as e:
    return _error(e)
  return 0


def _naming(text: str):
  from msa_jax.engine.interleave import Naming
  try:
    return Naming(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not one of {[n.value for n in Naming]}") from None


def _document_id(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} is not a document id (an integer >= 0)")
  return value


def _split(text: str):
  from msa_jax.data.documents import split_arg
  return split_arg(text)


def _model_args(p, *, text: bool) -> None:
  p.add_argument("--checkpoint", help="checkpoint directory, or 'niah' / 'multihop' (the shipped "
                                      "models; default 'niah')")
  if text:
    p.add_argument("--tokenizer", help="tokenizer.json overriding the checkpoint's")


def _text_args(p) -> None:
  p.add_argument("--split", type=_split, default=None,
                 help="file | paragraph | chars:N (default: text, and JSONL records without an "
                      "id, in pieces of the model's trained document size, chars:160 for the "
                      "shipped models; else paragraphs)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="msa-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  fwd = sub.add_parser("forward", help="training-path forward on a SPEC §13 batch")
  _model_args(fwd, text=False)
  fwd.add_argument("--batch", required=True, help="input .npz (input_ids, doc_ids, ...)")
  fwd.add_argument("--output", required=True, help="output .npz")
  fwd.add_argument("--reference", help="an .npz with outputs of the same names to compare against")
  fwd.set_defaults(run=_cmd_forward)
  enc = sub.add_parser("encode", help="stage 1: encode documents into an on-disk memory bank")
  _model_args(enc, text=True)
  _text_args(enc)
  enc.add_argument("--documents", required=True,
                   help=".jsonl ({\"text\": ..., optional \"id\", \"title\"} per line), .txt, "
                        ".md, a directory of them, or .npz token arrays (tokens [M, Lmax] -1 "
                        "padded, lengths [M], optional template [t])")
  enc.add_argument("--bank", required=True,
                   help="bank directory; re-running the same encode resumes it, other documents "
                        "are refused unless --append")
  enc.add_argument("--append", action="store_true",
                   help="add these documents to an existing bank under new ids (resumable too)")
  enc.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  enc.add_argument("--shard-docs", type=_positive_int, default=1024,
                   help="documents per committed shard")
  enc.set_defaults(run=_cmd_encode)
  gen = sub.add_parser("generate", help="stages 2-3: route, prefill and decode requests")
  _model_args(gen, text=False)
  gen.add_argument("--bank", required=True)
  gen.add_argument("--batch", required=True, help="request .npz in the SPEC §13 format")
  gen.add_argument("--max-new-tokens", type=_positive_int, required=True)
  gen.add_argument("--output", required=True)
  gen.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
  gen.add_argument("--top-p", type=_top_p, default=1.0, help="in (0, 1]")
  gen.add_argument("--seed", type=_seed, default=0)
  gen.add_argument("--stop-token", type=int, action="append", default=[])
  gen.add_argument("--content", choices=("device", "callback", "paged"),
                   help="how selected K/V reach the device (default: per backend)")
  gen.set_defaults(run=_cmd_generate)

  ask = sub.add_parser("ask", help="answer questions from a bank (Memory Interleave)")
  _model_args(ask, text=True)
  ask.add_argument("--bank", required=True)
  ask.add_argument("question", nargs="*", help="questions (or --questions FILE)")
  ask.add_argument("--questions", help="a file of questions, one per line ('-': standard input)")
  ask.add_argument("--json", action="store_true",
                   help="one JSON object per question: question, answer, rounds (documents: id, "
                        "score), latency_s")
  ask.add_argument("--naming", type=_naming, default=None,
                   help="model | router | router_until_end (default: the checkpoint's protocol)")
  ask.add_argument("--max-rounds", type=_positive_int, default=None,
                   help="retrieval rounds at most (default: the checkpoint's protocol)")
  ask.add_argument("--max-new-tokens", type=_positive_int, default=96,
                   help="answer tokens at most")
  ask.set_defaults(run=_cmd_ask)

  bank = sub.add_parser("bank", help="inspect and change a bank: info, add, delete, replace, "
                                     "compact")
  acts = bank.add_subparsers(dest="action", required=True)
  info = acts.add_parser("info", help="documents, chunks, bytes per tier, model, generation")
  info.add_argument("bank")
  info.add_argument("--json", action="store_true")
  add = acts.add_parser("add", help="encode more documents into the bank (new ids; resumable)")
  add.add_argument("bank")
  _model_args(add, text=True)
  _text_args(add)
  add.add_argument("--documents", required=True, help=".jsonl, .txt, .md or a directory")
  add.add_argument("--shard-docs", type=_positive_int, default=1024)
  delete = acts.add_parser("delete", help="delete documents by id")
  delete.add_argument("bank")
  delete.add_argument("ids", nargs="+", type=_document_id)
  replace = acts.add_parser("replace", help="re-encode live documents with new text (a .jsonl "
                                            "whose records name their \"id\")")
  replace.add_argument("bank")
  _model_args(replace, text=True)
  replace.add_argument("--documents", required=True)
  compact = acts.add_parser("compact", help="drop deleted documents from disk")
  compact.add_argument("bank")
  compact.add_argument("--max-shard-docs", type=_positive_int, default=None)
  bank.set_defaults(run=_cmd_bank)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
