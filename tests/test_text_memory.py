"""Documents in, answers out through `msa-jax encode` / `ask` / `bank` with the shipped NIAH model:
every text input format and split mode, the `ask --json` contract, bank subcommands equal to the
`TextMemory` API, bad inputs, resuming, and needles retrieved from a bank of real prose."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from msa_jax import cli
from msa_jax.data.documents import Split, TextDoc, read_documents, split_text
from msa_jax.memory import store
from msa_jax.nn.model import weights_fingerprint
from msa_jax.text_memory import TextMemory, bank_info, load_model

PROSE = pathlib.Path(__file__).parent / "data" / "prose"
# The shipped NIAH model was trained on documents of 160 characters: text files are split into
# pieces of that size unless --split says otherwise (JSONL records are kept whole).
DEFAULT_SPLIT = Split.parse("chars:160")
CONTEXT = 32768  # the shipped model's positions; it is byte-level, so one token a character


@dataclasses.dataclass(frozen=True)
class Run:
  status: int
  out: str
  err: str


def msa_jax(*argv) -> Run:
  """`msa-jax ARGV` in-process: its exit status (argparse errors included) and what it printed."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = cli.main([str(a) for a in argv])
    except SystemExit as e:
      status = e.code
  return Run(status, out.getvalue(), err.getvalue())


def ok(*argv) -> Run:
  run = msa_jax(*argv)
  assert run.status == 0, run.err
  return run


def question(key: str) -> str:
  return f"What is the special magic number for {key} mentioned in the provided text?"


def needle(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}."


def stored(bank: pathlib.Path) -> list[tuple[int, str, str | None]]:
  """(id, text, title) of the bank's documents, in bank order."""
  texts = store.read_texts(bank)
  return [(i, texts[i].text, texts[i].title) for i in store.open_bank(bank).doc_ids.tolist()]


def numbered(docs: list[TextDoc], first: int = 0) -> list[tuple[int, str, str | None]]:
  return [(first + k, d.text, d.title) for k, d in enumerate(docs)]


def write(path: pathlib.Path, text: str | bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


NOTES = {  # a small folder of notes: a .txt, and a .md one folder down
    "garden.txt": "Tomatoes need full sun and steady water.\n\nBasil grows best beside them, and "
                  "both dislike cold nights. Mulch keeps the soil moist in July.\n",
    "kitchen/bread.md": "# Bread\n\nMix flour, water, salt and yeast.\n\nLet it rise twice, "
                        "then bake at a high heat until the crust sounds hollow.\n",
}


def notes_folder(root: pathlib.Path) -> pathlib.Path:
  for rel, text in NOTES.items():
    write(root / rel, text)
  return root


@pytest.fixture(scope="module")
def notes_bank(tmp_path_factory) -> pathlib.Path:
  """A small bank of the notes folder (read-only: tests copy it before changing it)."""
  root = tmp_path_factory.mktemp("notes")
  ok("encode", "--documents", notes_folder(root / "notes"), "--bank", root / "bank")
  return root / "bank"


def copy_bank(bank: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
  shutil.copytree(bank, to)
  return to


# ------------------------------------------------------------------------------------------------
# 1. Input formats and split modes


def test_jsonl_ids_and_titles_round_trip_through_the_bank(tmp_path):
  docs = write(tmp_path / "docs.jsonl", "\n".join(json.dumps(r) for r in [
      {"id": 7, "title": "Seven", "text": "The seventh note is about rivers."},
      {"id": 3, "title": "Three", "text": "The third note is about\n\nmountains."},
      {"id": 12, "text": "The twelfth note has no title."},
  ]) + "\n")
  ok("encode", "--documents", docs, "--bank", tmp_path / "bank")
  assert store.open_bank(tmp_path / "bank").doc_ids.tolist() == [7, 3, 12]
  assert store.read_texts(tmp_path / "bank") == {
      7: store.DocText("The seventh note is about rivers.", "Seven"),
      3: store.DocText("The third note is about\n\nmountains.", "Three"),  # records stay whole
      12: store.DocText("The twelfth note has no title.", None)}


def test_jsonl_records_without_ids_are_cut_to_the_models_document_size(tmp_path):
  long = " ".join(f"Sentence number {i} says a little more about the river." for i in range(12))
  docs = write(tmp_path / "docs.jsonl", "\n".join(json.dumps(r) for r in [
      {"title": "River", "text": long}, {"text": "Short and whole."}]) + "\n")
  ok("encode", "--documents", docs, "--bank", tmp_path / "bank")
  pieces = split_text(long, Split.parse("chars:160"))  # the shipped models' trained size
  assert len(pieces) > 3
  assert stored(tmp_path / "bank") == [(i, t, "River") for i, t in enumerate(pieces)] + [
      (len(pieces), "Short and whole.", None)]
  ok("encode", "--documents", docs, "--bank", tmp_path / "whole", "--split", "file")
  assert [t for _, t, _ in stored(tmp_path / "whole")] == [long, "Short and whole."]


def test_a_txt_file_is_split_into_the_models_document_size_titled_by_its_name(tmp_path):
  ok("encode", "--documents", PROSE / "heapq.txt", "--bank", tmp_path / "bank")
  expected = read_documents(PROSE / "heapq.txt", DEFAULT_SPLIT)
  assert len(expected) == 16
  assert stored(tmp_path / "bank") == numbered(expected)
  assert {title for _, _, title in stored(tmp_path / "bank")} == {"heapq.txt"}


def test_an_md_file_is_read_like_text(tmp_path):
  md = write(tmp_path / "bread.md", NOTES["kitchen/bread.md"])
  ok("encode", "--documents", md, "--bank", tmp_path / "bank")
  assert stored(tmp_path / "bank") == [
      (0, "# Bread", "bread.md"),
      (1, "Mix flour, water, salt and yeast.", "bread.md"),
      (2, "Let it rise twice, then bake at a high heat until the crust sounds hollow.",
       "bread.md")]


def test_a_directory_gives_the_documents_of_its_files_titled_by_relative_path(tmp_path):
  folder = notes_folder(tmp_path / "notes")
  ok("encode", "--documents", folder, "--bank", tmp_path / "bank")
  expected = read_documents(folder, DEFAULT_SPLIT)
  assert stored(tmp_path / "bank") == numbered(expected)
  assert [title for _, _, title in stored(tmp_path / "bank")] == [
      "garden.txt", "garden.txt", "kitchen/bread.md", "kitchen/bread.md", "kitchen/bread.md"]


@pytest.mark.parametrize("split, count", [("file", 1), ("paragraph", 8), ("chars:200", 12)])
def test_split_gives_the_documents_read_documents_predicts(tmp_path, split, count):
  ok("encode", "--documents", PROSE / "heapq.txt", "--bank", tmp_path / "bank", "--split", split)
  expected = read_documents(PROSE / "heapq.txt", Split.parse(split))
  assert len(expected) == count
  assert stored(tmp_path / "bank") == numbered(expected)


# ------------------------------------------------------------------------------------------------
# 2 and 5. Real prose with needles: `ask --json` and retrieval


NEEDLES = {  # key -> value; the keys occur nowhere in the prose
    "amber-falcon": "4172093",
    "silent-meadow": "8305516",
    "copper-lantern": "2960748",
}


@pytest.fixture(scope="module")
def prose_bank(tmp_path_factory):
  """The prose folder encoded with the default split, then one needle file a key added with
  `bank add`. Returns (bank, {key: (needle id, needle file name)})."""
  root = tmp_path_factory.mktemp("prose")
  bank = root / "bank"
  ok("encode", "--documents", PROSE, "--bank", bank)
  prose_docs = len(read_documents(PROSE, DEFAULT_SPLIT))
  for k, (key, value) in enumerate(NEEDLES.items()):
    write(root / "needles" / f"note-{k}.txt", needle(key, value) + "\n")
  ok("bank", "add", bank, "--documents", root / "needles")
  assert prose_docs == 171  # the pieces of the six docstrings and the folder's README.md
  # files are read in sorted order and take the next free ids
  needles = {key: (prose_docs + k, f"note-{k}.txt") for k, key in enumerate(NEEDLES)}
  texts = store.read_texts(bank)
  for key, (i, name) in needles.items():
    assert texts[i] == store.DocText(needle(key, NEEDLES[key]), name)
  return bank, needles


@pytest.fixture(scope="module")
def json_answers(prose_bank, tmp_path_factory):
  """`ask --json` of the three needle questions: the first as an argument, the others from a
  --questions file."""
  bank, _ = prose_bank
  first, *rest = [question(key) for key in NEEDLES]
  file = write(tmp_path_factory.mktemp("questions") / "questions.txt", "\n".join(rest) + "\n")
  return ok("ask", "--bank", bank, "--json", first, "--questions", file).out


def test_ask_json_prints_one_object_a_question_in_order(json_answers):
  lines = json_answers.splitlines()
  assert [json.loads(line)["question"] for line in lines] == [question(k) for k in NEEDLES]


def test_ask_json_objects_have_exactly_the_documented_keys_and_types(json_answers, prose_bank):
  bank, _ = prose_bank
  ids = set(store.open_bank(bank).doc_ids.tolist())
  for line in json_answers.splitlines():
    obj = json.loads(line)
    assert set(obj) == {"question", "answer", "rounds", "latency_s"}
    assert type(obj["question"]) is str and type(obj["answer"]) is str
    assert type(obj["latency_s"]) is float and obj["latency_s"] >= 0
    assert type(obj["rounds"]) is list and len(obj["rounds"]) >= 1
    for rnd in obj["rounds"]:
      assert set(rnd) == {"documents"} and len(rnd["documents"]) >= 1
      for doc in rnd["documents"]:
        assert set(doc) == {"id", "score"}
        assert type(doc["id"]) is int and doc["id"] in ids
        assert type(doc["score"]) is float
      scores = [doc["score"] for doc in rnd["documents"]]
      assert scores == sorted(scores, reverse=True)
      assert len({doc["id"] for doc in rnd["documents"]}) == len(scores)


def test_needles_added_to_real_prose_are_retrieved_and_answered(json_answers, prose_bank):
  _, needles = prose_bank
  answers = [json.loads(line) for line in json_answers.splitlines()]
  top = {}
  for key, a in zip(NEEDLES, answers):
    assert NEEDLES[key] in a["answer"], (key, a["answer"])
    top[key] = a["rounds"][0]["documents"][0]["id"] == needles[key][0]
  # Measured with the shipped model: every answer is exactly its value, and each needle is the top
  # round-1 document (3 of 3) among the 171 pieces of prose, scoring 0.88-0.90 against at most
  # 0.65 for the best prose piece; so all three are required.
  assert top == {key: True for key in NEEDLES}


def test_ask_without_json_shows_the_retrieved_needles_file_name(prose_bank):
  bank, needles = prose_bank
  key = "silent-meadow"
  out = ok("ask", "--bank", bank, question(key)).out
  q, a = out.splitlines()[:2]
  assert q == f"Q: {question(key)}" and a.startswith("A: ") and NEEDLES[key] in a
  # each routed document as "[id] score  title", best first
  shown = re.findall(r"^ +\*? +\[(\d+)\] +-?[\d.]+ +(.+)$", out, re.MULTILINE)
  assert shown[0] == (str(needles[key][0]), needles[key][1])


# ------------------------------------------------------------------------------------------------
# 3. Bank subcommands equal the Python API


def bank_state(bank: pathlib.Path):
  b = store.open_bank(bank)
  return (b.doc_ids.tolist(), b.lengths.tolist(), b.live.tolist(),
          {l: np.asarray(a).tobytes() for l, a in sorted(b.routing_keys.items())},
          store.read_texts(bank))


def info_json(bank: pathlib.Path) -> dict:
  return json.loads(ok("bank", "info", bank, "--json").out)


def test_bank_add_delete_and_compact_equal_the_python_api(notes_bank, tmp_path):
  more = write(tmp_path / "more" / "tea.txt", "Green tea wants water below boiling.\n\n"
                                              "Black tea takes it boiling, for four minutes.\n")
  by_cli = copy_bank(notes_bank, tmp_path / "cli")
  by_api = copy_bank(notes_bank, tmp_path / "api")
  assert bank_state(by_cli) == bank_state(by_api)

  ok("bank", "add", by_cli, "--documents", tmp_path / "more")
  assert info_json(by_cli)["live_docs"] == 7
  ok("bank", "delete", by_cli, 1, 5)
  assert info_json(by_cli)["live_docs"] == 5
  ok("bank", "compact", by_cli)

  mem = TextMemory.open(by_api)
  assert mem.add_path(tmp_path / "more").ids == (5, 6)
  mem.delete([1, 5])
  assert mem.compact() == 2

  assert bank_state(by_cli) == bank_state(by_api)
  assert [i for i, _, _ in stored(by_api)] == [0, 2, 3, 4, 6]
  info = info_json(by_api)
  assert info == mem.info()
  assert {**info_json(by_cli), "path": str(by_api)} == info
  bank = store.open_bank(by_api)
  assert info["live_docs"] == int(bank.live.sum()) == len(store.read_texts(by_api)) == 5
  assert info["stored_docs"] == bank.num_docs == 5
  assert info["chunks"] == int(bank.chunk_count.sum()) == bank.num_chunks
  assert info["next_doc_id"] == 7


def test_bank_replace_equals_the_python_api(notes_bank, tmp_path):
  replacement = write(tmp_path / "new.jsonl", "\n".join(json.dumps(r) for r in [
      {"id": 3, "title": "bread, revised", "text": "Let it rise once, overnight, in the cold."},
      {"id": 0, "text": "Tomatoes need six hours of sun."},
  ]) + "\n")
  by_cli = copy_bank(notes_bank, tmp_path / "cli")
  by_api = copy_bank(notes_bank, tmp_path / "api")

  ok("bank", "replace", by_cli, "--documents", replacement)
  mem = TextMemory.open(by_api)
  assert mem.replace(read_documents(replacement)) == (3, 0)

  assert bank_state(by_cli) == bank_state(by_api)
  texts = store.read_texts(by_api)
  assert texts[3] == store.DocText("Let it rise once, overnight, in the cold.", "bread, revised")
  assert texts[0] == store.DocText("Tomatoes need six hours of sun.", None)
  assert info_json(by_api) == mem.info()


# ------------------------------------------------------------------------------------------------
# 4. Bad inputs: status 2 and one message naming the problem


def bad_folder(kind: str, root: pathlib.Path) -> pathlib.Path:
  folder = root / kind
  folder.mkdir()
  if kind == "binary":
    write(folder / "scan.txt", b"PK\x03\x04\x00\x00binary")
  elif kind == "latin-1":
    write(folder / "caf\xe9.txt", "Un caf\xe9 cr\xe8me.".encode("latin-1"))
  return folder


@pytest.mark.parametrize("kind, message", [
    ("empty", "no .txt, .md or .jsonl files in"),
    ("binary", "scan.txt: looks binary (NUL byte at byte offset 4)"),
    ("latin-1", "caf\xe9.txt: not valid UTF-8 at byte offset 6 (line 1)"),
])
def test_encode_refuses_a_folder_it_cannot_read_and_makes_no_bank(tmp_path, kind, message):
  run = msa_jax("encode", "--documents", bad_folder(kind, tmp_path), "--bank", tmp_path / "bank")
  assert run.status == 2
  assert message in run.err and run.err.startswith("error: ")
  assert not (tmp_path / "bank" / store.MANIFEST).exists()


def test_deleting_an_unknown_id_is_refused_and_changes_nothing(notes_bank, tmp_path):
  bank = copy_bank(notes_bank, tmp_path / "bank")
  manifest = (bank / store.MANIFEST).read_bytes()
  run = msa_jax("bank", "delete", bank, 2, 99)
  assert run.status == 2
  assert "document ids [99] are not live in the bank" in run.err
  assert (bank / store.MANIFEST).read_bytes() == manifest


def test_a_bank_refuses_a_model_of_the_same_config_but_other_weights(notes_bank):
  # The shipped models share one config, so only the bank's weights fingerprint tells them apart.
  run = msa_jax("ask", "--bank", notes_bank, "--checkpoint", "multihop", question("quiet-river"))
  assert run.status == 2
  assert "the bank was encoded by other weights" in run.err
  assert bank_info(notes_bank)["model"]["weights_sha256"] == weights_fingerprint(
      load_model().model)


def test_deleting_a_non_integer_id_is_a_usage_error(notes_bank):
  run = msa_jax("bank", "delete", notes_bank, "two")
  assert run.status == 2
  assert "'two' is not a document id (an integer >= 0)" in run.err


def test_a_question_longer_than_the_models_context_is_refused(notes_bank):
  long = "Why " + "very " * 8000 + "long?"  # 40,009 characters: more than 32768 byte tokens
  assert len(long) > CONTEXT
  run = msa_jax("ask", "--bank", notes_bank, long)
  assert run.status == 2
  assert f"does not fit the model's {CONTEXT} positions" in run.err


def test_ask_without_a_question_is_refused(notes_bank):
  run = msa_jax("ask", "--bank", notes_bank)
  assert run.status == 2
  assert "no question given" in run.err


def test_ask_on_a_missing_bank_names_it(tmp_path):
  run = msa_jax("ask", "--bank", tmp_path / "nowhere", question("amber-falcon"))
  assert run.status == 2
  assert f"no memory bank at {tmp_path / 'nowhere'}" in run.err
  assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------
# 6. Resuming


def test_encoding_the_same_folder_again_does_nothing(notes_bank, tmp_path):
  bank = copy_bank(notes_bank, tmp_path / "bank")
  manifest = (bank / store.MANIFEST).read_bytes()
  run = ok("encode", "--documents", notes_folder(tmp_path / "notes"), "--bank", bank)
  assert "already holds all 5 documents of this input" in run.out
  assert "nothing to do" in run.out
  assert (bank / store.MANIFEST).read_bytes() == manifest


def test_encoding_another_folder_into_the_bank_needs_append(notes_bank, tmp_path):
  bank = copy_bank(notes_bank, tmp_path / "bank")
  manifest = (bank / store.MANIFEST).read_bytes()
  other = write(tmp_path / "other" / "a.txt", "A different note.\n").parent
  run = msa_jax("encode", "--documents", other, "--bank", bank)
  assert run.status == 2
  assert "holds documents encoded from another input" in run.err and "--append" in run.err
  assert (bank / store.MANIFEST).read_bytes() == manifest
  ok("encode", "--documents", other, "--bank", bank, "--append")
  assert stored(bank)[-1] == (5, "A different note.", "a.txt")


def test_an_answer_ends_at_the_models_first_control_token():
  from msa_jax.text_memory import clean_answer
  assert clean_answer(" 4172093<|im_end|>noise") == "4172093"
  assert clean_answer("4172]<|object_ref_end|>Th-rivee tior<|im_end|>") == "4172]"
  assert clean_answer("no control token ") == "no control token"
