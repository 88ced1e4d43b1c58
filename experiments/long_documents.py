"""Why text is cut to the model's trained document size: needles in long JSONL records.

  python experiments/long_documents.py            # ~1 min on a 2-core CPU

Builds 36 JSONL records of 1,200 characters of Python standard-library docstrings (whitespace
collapsed), inserts a needle sentence at a sentence boundary in 4 of them, and asks the shipped
NIAH model for each needle's value through `msa-jax encode` + `msa-jax ask --json`: once with the
records whole (`--split file`) and once with the default split (pieces of the model's trained
size, `chars:160`). Prints the answers and how many are right.
"""

import contextlib
import io
import json
import os
import pathlib
import pydoc
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from msa_jax import cli  # noqa: E402

MODULES = ("argparse json csv heapq re cmd textwrap collections itertools functools pathlib "
           "subprocess logging unittest email http xml sqlite3 typing asyncio os sys string "
           "random statistics decimal fractions datetime calendar zipfile tarfile shutil glob "
           "tempfile pickle copy pprint enum dataclasses contextlib abc io time threading queue "
           "socket ssl select signal mmap").split()
NEEDLES = (("amber-falcon", "4172093"), ("silent-meadow", "8305516"),
           ("copper-lantern", "2960748"), ("quiet-river", "5550173"))
RECORD = 1200


def records() -> list[dict]:
  import importlib
  text = " ".join(" ".join(pydoc.getdoc(importlib.import_module(m)).split()) for m in MODULES)
  n = len(text) // RECORD
  out = [{"text": text[i * RECORD:(i + 1) * RECORD], "title": f"record {i}"} for i in range(n)]
  rng = np.random.default_rng(0)
  for j, (key, value) in enumerate(NEEDLES):
    r = out[3 + j * (n // 5)]
    at = r["text"].find(". ", int(rng.integers(100, 900))) + 2
    r["text"] = (r["text"][:at] + f"One of the special magic numbers for {key} is: {value}. "
                 + r["text"][at:])
  return out


def msa_jax(*argv) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    if cli.main([str(a) for a in argv]) != 0:
      raise RuntimeError(f"msa-jax {argv[0]} failed")
  return out.getvalue()


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    docs = pathlib.Path(tmp) / "docs.jsonl"
    recs = records()
    docs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"{len(recs)} records of {RECORD} characters, {len(NEEDLES)} needles")
    for name, split in (("whole records", ["--split", "file"]), ("default split", [])):
      bank = pathlib.Path(tmp) / name.replace(" ", "_")
      msa_jax("encode", "--documents", docs, "--bank", bank, *split)
      out = msa_jax("ask", "--bank", bank, "--json", *[
          f"What is the special magic number for {k} mentioned in the provided text?"
          for k, _ in NEEDLES])
      answers = [json.loads(line)["answer"] for line in out.splitlines()]
      right = sum(v in a for a, (_, v) in zip(answers, NEEDLES))
      print(f"{name}: {right} of {len(NEEDLES)} right; answers {answers}")


if __name__ == "__main__":
  app.run(main)
