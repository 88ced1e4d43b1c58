"""User text inputs as documents: split modes, the chars packing invariants, and file reading."""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re

import pytest

from msa_jax.data import documents
from msa_jax.data.documents import (DocumentsError, Split, SplitKind, TextDoc, describe,
                                    read_documents, split_arg, split_text)

PARAGRAPH = Split(SplitKind.PARAGRAPH)
FILE = Split(SplitKind.FILE)


def chars(n: int) -> Split:
  return Split(SplitKind.CHARS, n)


# ----------------------------------------------------------------------------------------------
# Split.parse


@pytest.mark.parametrize("text, expected", [
    ("file", Split(SplitKind.FILE)),
    ("paragraph", Split(SplitKind.PARAGRAPH)),
    ("chars:16", Split(SplitKind.CHARS, 16)),
    ("chars:160", Split(SplitKind.CHARS, 160)),
    ("  CHARS:200 ", Split(SplitKind.CHARS, 200)),
    ("Paragraph", Split(SplitKind.PARAGRAPH)),
])
def test_parse_accepts_the_three_modes(text, expected):
  assert Split.parse(text) == expected


@pytest.mark.parametrize("text", [
    "", "chars", "chars:", "chars:15", "chars:0", "chars:-20", "chars:16.0", "chars:1e3",
    "chars: 160", "chars:+20", "chars:16:2", "words:100", "para", "files", "file:100",
])
def test_parse_rejects_anything_else(text):
  with pytest.raises(DocumentsError, match="invalid split"):
    Split.parse(text)


@pytest.mark.parametrize("text", ["file", "paragraph", "chars:16", "chars:160"])
def test_str_of_a_split_parses_back_to_it(text):
  assert str(Split.parse(text)) == text


def test_split_validates_its_fields():
  with pytest.raises(DocumentsError, match=">= 16"):
    Split(SplitKind.CHARS)
  with pytest.raises(DocumentsError, match=">= 16"):
    Split(SplitKind.CHARS, 15)
  with pytest.raises(DocumentsError, match="chars split only"):
    Split(SplitKind.FILE, 100)


def test_split_arg_works_as_an_argparse_type(capsys):
  parser = argparse.ArgumentParser(prog="msa-jax")
  parser.add_argument("--split", type=split_arg)
  assert parser.parse_args(["--split", "chars:160"]).split == Split(SplitKind.CHARS, 160)
  with pytest.raises(argparse.ArgumentTypeError):
    split_arg("chars:8")
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(["--split", "chars:8"])
  assert exit_info.value.code == 2
  assert "chars:N" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# split_text: hand-written examples


def test_file_split_is_the_stripped_text_or_nothing():
  assert split_text("\n  One.\n\nTwo.  \n", FILE) == ["One.\n\nTwo."]
  assert split_text(" \n\t \n", FILE) == []
  assert split_text("", FILE) == []


def test_paragraph_split_breaks_at_blank_and_whitespace_only_lines():
  text = "  First line\nsecond line.\n\nSecond para.\n \t \n\n\nThird\r\n\r\nFourth\n\n  \n"
  assert split_text(text, PARAGRAPH) == [
      "First line\nsecond line.", "Second para.", "Third", "Fourth"]


def test_paragraph_split_of_whitespace_is_empty():
  assert split_text("\n\n \n\t\n", PARAGRAPH) == []
  assert split_text("", PARAGRAPH) == []


def test_chars_packs_as_many_whole_sentences_as_fit():
  text = "One two. Three four! Five six? Seven eight."
  # "One two. Three four!" is 20 characters.
  assert split_text(text, chars(20)) == ["One two. Three four!", "Five six?", "Seven eight."]
  assert split_text(text, chars(19)) == ["One two.", "Three four!", "Five six?", "Seven eight."]
  assert split_text(text, chars(31)) == ["One two. Three four! Five six?", "Seven eight."]
  assert split_text(text, chars(len(text))) == [text]


def test_chars_prefers_a_sentence_end_over_a_fuller_piece():
  text = "Hi. This sentence is rather long indeed"
  assert split_text(text, chars(20)) == ["Hi.", "This sentence is", "rather long indeed"]


def test_chars_breaks_a_long_sentence_at_whitespace_and_packs_its_tail_with_what_follows():
  text = "alpha beta gamma delta epsilon zeta. Eta. Theta iota kappa."
  assert split_text(text, chars(16)) == [
      "alpha beta gamma", "delta epsilon", "zeta. Eta.", "Theta iota", "kappa."]


def test_chars_sentence_end_may_close_with_quotes_and_brackets():
  text = 'He said "stop." Then (he left.) And "why?!" she asked.'
  assert split_text(text, chars(30)) == [
      'He said "stop."', 'Then (he left.) And "why?!"', "she asked."]
  assert split_text(text, chars(26)) == [
      'He said "stop."', "Then (he left.)", 'And "why?!" she asked.']


def test_chars_punctuation_inside_a_word_is_no_sentence_end():
  text = "see version 1.2.3 of file.txt today ok"
  assert split_text(text, chars(22)) == ["see version 1.2.3 of", "file.txt today ok"]


def test_chars_hard_cuts_only_a_word_longer_than_n():
  word = "abcdefghijklmnopqrstuvwxyz0123456789"  # 36 characters
  assert split_text(f"{word} tail end.", chars(16)) == [
      "abcdefghijklmnop", "qrstuvwxyz012345", "6789 tail end."]
  assert split_text("x" * 16, chars(16)) == ["x" * 16]
  assert split_text("x" * 17, chars(16)) == ["x" * 16, "x"]


def test_chars_piece_of_exactly_n_characters_is_allowed():
  # "aaaa bbbb cccc d" is 16 characters; one more and it breaks.
  assert split_text("aaaa bbbb cccc d eeee", chars(16)) == ["aaaa bbbb cccc d", "eeee"]
  assert split_text("aaaa bbbb cccc dd eeee", chars(16)) == ["aaaa bbbb cccc", "dd eeee"]


def test_chars_never_crosses_a_paragraph_and_keeps_inner_newlines():
  text = "Short one.\n\nA line\nwrapped here. And more text.\n\n\nEnd."
  assert split_text(text, chars(40)) == [
      "Short one.", "A line\nwrapped here. And more text.", "End."]
  assert split_text(text, chars(20)) == [
      "Short one.", "A line\nwrapped here.", "And more text.", "End."]


def test_chars_pieces_keep_inner_whitespace_runs():
  assert split_text("a  b.   c\td", chars(16)) == ["a  b.   c\td"]
  assert split_text("aaaa  bbbb.   cccccc\tdddd", chars(16)) == ["aaaa  bbbb.", "cccccc\tdddd"]


# ----------------------------------------------------------------------------------------------
# split_text: the chars invariants on random text

_LETTERS = "abcdefghijklmnopqrstuvwxyzéßж中"
_SENTENCE_END = re.compile(r"[.!?][\"'”’»)\]}]*(?=\s|$)")


def _random_text(rng: random.Random) -> str:
  paragraphs = []
  for _ in range(rng.randint(1, 5)):
    sentences = []
    for _ in range(rng.randint(1, 6)):
      words = []
      for _ in range(rng.randint(1, 12)):
        # Mostly tiny and short words; now and then one longer than the smaller limits.
        long_word = rng.random() < 0.03
        size = rng.randint(17, 70) if long_word else rng.choice([1, 1, 2, 3, 4, 5, 6, 8, 10, 12])
        words.append("".join(rng.choice(_LETTERS) for _ in range(size)))
        if rng.random() < 0.05:
          words[-1] += rng.choice([",", ";", "e.g.", "3.14"])
      end = rng.choice([".", "!", "?", "...", '."', ".)", "?']", ""])
      gaps = [rng.choice([" ", " ", " ", "  ", "\n", "\t", " \n "]) for _ in words]
      sentence = "".join(w + g for w, g in zip(words, gaps)).rstrip() + end
      sentences.append(sentence)
    paragraph = "".join(s + rng.choice([" ", "  ", "\n", " \t"]) for s in sentences)
    paragraphs.append(paragraph)
  separators = ["\n\n", "\n \n", "\n\t\n\n", "\r\n\r\n", "\n  \n \n"]
  lead, trail = rng.choice(["", " ", "\n\n"]), rng.choice(["", "\n", " \n\n"])
  return lead + "".join(p + rng.choice(separators) for p in paragraphs).rstrip() + trail


def _reference_paragraphs(text: str) -> list[str]:
  """Groups of lines between blank lines, written independently of the module."""
  groups, current = [], []
  for line in text.split("\n"):
    if line.strip():
      current.append(line)
    elif current:
      groups.append(current)
      current = []
  if current:
    groups.append(current)
  return ["\n".join(g).strip() for g in groups]


def _spans(paragraph: str, pieces: list[str]) -> list[tuple[int, int]]:
  """Where the pieces lie in the paragraph; asserts the gaps between them are whitespace."""
  spans, pos = [], 0
  for piece in pieces:
    start = pos + len(paragraph[pos:]) - len(paragraph[pos:].lstrip())
    assert paragraph.startswith(piece, start), (paragraph, piece)
    spans.append((start, start + len(piece)))
    pos = start + len(piece)
  assert pos == len(paragraph)
  return spans


def _expected_end(paragraph: str, start: int, n: int) -> int:
  """The greedy rule: last sentence end that fits, else last word end, else a hard cut."""
  limit = start + n
  if len(paragraph) <= limit:
    return len(paragraph)
  sentence_ends = [m.end() for m in _SENTENCE_END.finditer(paragraph) if start < m.end() <= limit]
  if sentence_ends:
    return sentence_ends[-1]
  word_ends = [m.end() for m in re.finditer(r"\S+", paragraph) if start < m.end() <= limit]
  return word_ends[-1] if word_ends else limit


@pytest.mark.parametrize("n", [16, 17, 18, 20, 23, 31, 40, 64, 100, 160, 1000])
def test_chars_invariants_on_random_text(n):
  rng = random.Random(1234 + n)
  for _ in range(150):
    text = _random_text(rng)
    pieces = split_text(text, chars(n))
    paragraphs = _reference_paragraphs(text)
    assert split_text(text, PARAGRAPH) == paragraphs
    for piece in pieces:
      assert 0 < len(piece) <= n
      assert piece == piece.strip()
    # Each paragraph is exactly its own consecutive pieces, separated by whitespace only.
    rest = pieces
    for paragraph in paragraphs:
      mine = split_text(paragraph, chars(n))
      assert rest[:len(mine)] == mine
      rest = rest[len(mine):]
      spans = _spans(paragraph, mine)
      for (start, end), (next_start, _) in zip(spans, spans[1:]):
        # Gaps are empty only after a hard cut of a word longer than n.
        assert next_start > end or end - start == n
      for start, end in spans:
        assert end == _expected_end(paragraph, start, n), (paragraph, start)
    assert rest == []


def test_chars_invariants_hold_for_a_word_longer_than_n():
  word = "w" * 50
  text = f"tiny a b. {word} c d e. f"
  pieces = split_text(text, chars(16))
  assert max(map(len, pieces)) <= 16
  assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
  assert pieces == ["tiny a b.", "w" * 16, "w" * 16, "w" * 16, "ww c d e. f"]


# ----------------------------------------------------------------------------------------------
# describe


def test_describe_uses_the_title_when_there_is_one():
  assert describe(TextDoc("some text", title="notes/a.txt")) == "notes/a.txt"


def test_describe_shows_the_first_words_otherwise():
  doc = TextDoc("one two\nthree  four five six seven eight nine ten")
  assert describe(doc) == "one two three four five six seven eight…"
  assert describe(doc, words=3) == "one two three…"
  assert describe(TextDoc("just three words")) == "just three words"
  assert describe(TextDoc("exactly four words here"), words=4) == "exactly four words here"


# ----------------------------------------------------------------------------------------------
# read_documents: JSONL


def _write_jsonl(path: pathlib.Path, records: list) -> pathlib.Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                  encoding="utf-8")
  return path


def test_jsonl_records_become_documents_as_given(tmp_path):
  path = _write_jsonl(tmp_path / "docs.jsonl", [
      {"text": "Alpha beta.", "id": 7, "title": "First"},
      "",
      "   ",
      {"text": "  Gamma\n\ndelta  ", "extra": [1, 2]},
      {"text": "Epsilon.", "id": 0, "title": None},
      {"text": "Zeta.", "id": None, "title": "Last"},
  ])
  assert read_documents(path) == [
      TextDoc("Alpha beta.", "First", 7),
      TextDoc("  Gamma\n\ndelta  ", None, None),
      TextDoc("Epsilon.", None, 0),
      TextDoc("Zeta.", "Last", None),
  ]
  assert read_documents(str(path))[0] == TextDoc("Alpha beta.", "First", 7)


def test_jsonl_with_a_split_splits_each_record_keeping_its_title(tmp_path):
  path = _write_jsonl(tmp_path / "docs.jsonl", [
      {"text": "One.\n\nTwo.", "title": "pair"},
      {"text": "Only one paragraph.", "id": 3, "title": "single"},
  ])
  assert read_documents(path, PARAGRAPH) == [
      TextDoc("One.", "pair"), TextDoc("Two.", "pair"),
      TextDoc("Only one paragraph.", "single", 3)]
  assert read_documents(path, FILE) == [
      TextDoc("One.\n\nTwo.", "pair"), TextDoc("Only one paragraph.", "single", 3)]


def test_jsonl_id_on_a_record_that_splits_is_an_error_naming_the_line(tmp_path):
  path = _write_jsonl(tmp_path / "docs.jsonl", [
      {"text": "Fine."}, {"text": "One.\n\nTwo.", "id": 5}])
  assert len(read_documents(path)) == 2  # no split: fine
  with pytest.raises(DocumentsError, match=r"docs\.jsonl:2: .*id 5 splits into 2 pieces"):
    read_documents(path, PARAGRAPH)


@pytest.mark.parametrize("line, problem", [
    ('{"text": "a"', "invalid JSON"),
    ("not json", "invalid JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ('{"title": "t"}', 'missing "text"'),
    ('{"text": 3}', '"text" must be a string, got int'),
    ('{"text": null}', '"text" must be a string, got null'),
    ('{"text": "  \\n "}', '"text" is empty'),
    ('{"text": "a", "id": true}', '"id" must be a non-negative integer, got true'),
    ('{"text": "a", "id": -1}', '"id" must be a non-negative integer, got -1'),
    ('{"text": "a", "id": 1.0}', '"id" must be a non-negative integer, got 1.0'),
    ('{"text": "a", "id": "1"}', '"id" must be a non-negative integer, got "1"'),
    ('{"text": "a", "title": 2}', '"title" must be a string, got int'),
])
def test_malformed_jsonl_line_is_an_error_naming_its_line_number(tmp_path, line, problem):
  path = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", line])
  with pytest.raises(DocumentsError) as info:
    read_documents(path)
  message = str(info.value)
  assert message.startswith(f"{path}:3: ")
  assert problem in message


def test_duplicate_jsonl_id_is_an_error_naming_both_lines(tmp_path):
  path = _write_jsonl(tmp_path / "dup.jsonl", [
      {"text": "a", "id": 4}, {"text": "b", "id": 5}, {"text": "c", "id": 4}])
  with pytest.raises(DocumentsError, match=rf"dup\.jsonl:3: duplicate id 4 .*dup\.jsonl:1\)"):
    read_documents(path)


def test_ids_are_unique_across_the_files_of_a_directory(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "id": 1}])
  _write_jsonl(tmp_path / "b.jsonl", [{"text": "b", "id": 1}])
  with pytest.raises(DocumentsError, match=r"b\.jsonl:1: duplicate id 1 .*a\.jsonl:1"):
    read_documents(tmp_path)


def test_jsonl_lines_end_only_at_newlines(tmp_path):
  # U+2028 is legal raw inside a JSON string and must not split the record.
  path = tmp_path / "sep.jsonl"
  path.write_text('{"text": "a\u2028b"}\r\n{"text": "c"}', encoding="utf-8")
  assert read_documents(path) == [TextDoc("a\u2028b"), TextDoc("c")]


# ----------------------------------------------------------------------------------------------
# read_documents: text files and directories


def test_text_file_defaults_to_paragraphs_titled_by_its_name(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("First para\nstill first.\n\nSecond.\n", encoding="utf-8")
  assert read_documents(path) == [
      TextDoc("First para\nstill first.", "notes.txt"), TextDoc("Second.", "notes.txt")]


def test_markdown_file_with_explicit_splits(tmp_path):
  path = tmp_path / "README.MD"
  path.write_text("# Title\n\nOne sentence. Another sentence here.\n", encoding="utf-8")
  assert read_documents(path, FILE) == [
      TextDoc("# Title\n\nOne sentence. Another sentence here.", "README.MD")]
  assert [d.text for d in read_documents(path, chars(20))] == [
      "# Title", "One sentence.", "Another sentence", "here."]


def test_windows_and_old_mac_newlines_become_newlines(tmp_path):
  path = tmp_path / "crlf.txt"
  path.write_bytes(b"a\r\nb\r\n\r\nc\rd\r\re")
  assert [d.text for d in read_documents(path)] == ["a\nb", "c\nd", "e"]


def test_utf8_bom_is_removed(tmp_path):
  txt = tmp_path / "bom.txt"
  txt.write_bytes(b"\xef\xbb\xbfHello \xc3\xa9t\xc3\xa9.")
  assert read_documents(txt) == [TextDoc("Hello été.", "bom.txt")]
  jsonl = tmp_path / "bom.jsonl"
  jsonl.write_bytes(b'\xef\xbb\xbf{"text": "x", "id": 1}\n')
  assert read_documents(jsonl) == [TextDoc("x", None, 1)]


def test_binary_file_is_an_error(tmp_path):
  path = tmp_path / "data.txt"
  path.write_bytes(b"abc\x00\x01\x02")
  with pytest.raises(DocumentsError, match=r"data\.txt: looks binary \(NUL byte at byte offset 3"):
    read_documents(path)


def test_non_utf8_text_is_an_error_naming_the_byte_offset(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("héllo\n".encode("utf-8") + "wörld".encode("latin-1"))
  # "héllo\n" is 7 bytes; "w" is at 7, the latin-1 "ö" at 8.
  with pytest.raises(DocumentsError,
                     match=r"latin1\.txt: not valid UTF-8 at byte offset 8 \(line 2\)"):
    read_documents(path)


def test_non_utf8_offset_counts_the_bom(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbfab\xff")
  with pytest.raises(DocumentsError, match="byte offset 5"):
    read_documents(path)


@pytest.mark.parametrize("name, content", [
    ("blank.txt", " \n\t\n\n  "), ("empty.md", ""), ("blank.jsonl", "\n  \n")])
def test_whitespace_only_file_has_no_documents(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  with pytest.raises(DocumentsError, match=f"no documents in {re.escape(str(path))}"):
    read_documents(path)


def test_missing_path_is_an_error(tmp_path):
  with pytest.raises(DocumentsError, match=r"nope\.txt: no such file or directory"):
    read_documents(tmp_path / "nope.txt")


@pytest.mark.parametrize("name, shown", [
    ("paper.pdf", "'.pdf'"), ("LICENSE", "without an extension")])
def test_unsupported_extension_is_an_error_listing_the_supported_ones(tmp_path, name, shown):
  path = tmp_path / name
  path.write_text("text", encoding="utf-8")
  with pytest.raises(DocumentsError) as info:
    read_documents(path)
  message = str(info.value)
  assert name in message and shown in message
  assert all(suffix in message for suffix in (".jsonl", ".txt", ".md"))


def _tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
  return root


def test_directory_is_read_recursively_in_sorted_relative_path_order(tmp_path):
  _tree(tmp_path, {
      "b.txt": "B one.\n\nB two.",
      "a/z.md": "AZ.",
      "a/b/c.txt": "ABC.",
      "Upper.txt": "Upper.",  # code point order: capitals first
      "notes.jsonl": json.dumps({"text": "Record.", "id": 9, "title": "rec"}),
      "image.png": "not text",
      "script.py": "print()",
      ".hidden.txt": "Hidden file.",
      ".git/config.txt": "Hidden dir.",
      "a/.cache/x.md": "Nested hidden dir.",
  })
  assert read_documents(tmp_path) == [
      TextDoc("Upper.", "Upper.txt"),
      TextDoc("ABC.", "a/b/c.txt"),
      TextDoc("AZ.", "a/z.md"),
      TextDoc("B one.", "b.txt"),
      TextDoc("B two.", "b.txt"),
      TextDoc("Record.", "rec", 9),
  ]


def test_directory_split_applies_to_every_file(tmp_path):
  _tree(tmp_path, {"x.txt": "P one.\n\nP two.", "y.jsonl": json.dumps({"text": "R1.\n\nR2."})})
  assert [d.text for d in read_documents(tmp_path, FILE)] == ["P one.\n\nP two.", "R1.\n\nR2."]
  assert [d.text for d in read_documents(tmp_path)] == ["P one.", "P two.", "R1.\n\nR2."]


def test_empty_directory_is_an_error(tmp_path):
  with pytest.raises(DocumentsError,
                     match=rf"no \.txt, \.md or \.jsonl files in {re.escape(str(tmp_path))}"):
    read_documents(tmp_path)


def test_directory_of_other_or_hidden_files_is_an_error(tmp_path):
  _tree(tmp_path, {"photo.png": "x", "data.csv": "a,b", ".secret.txt": "hidden"})
  with pytest.raises(DocumentsError, match=r"no \.txt, \.md or \.jsonl files in"):
    read_documents(tmp_path)


def test_directory_of_whitespace_only_files_has_no_documents(tmp_path):
  _tree(tmp_path, {"a.txt": "\n\n", "b/c.md": "   "})
  with pytest.raises(DocumentsError, match="no documents in"):
    read_documents(tmp_path)


def test_errors_inside_a_directory_name_the_file(tmp_path):
  _tree(tmp_path, {"good.txt": "Fine."})
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "bad.md").write_bytes(b"ok \xfe")
  with pytest.raises(DocumentsError, match=r"sub/bad\.md: not valid UTF-8 at byte offset 3"):
    read_documents(tmp_path)


def test_each_file_is_read_once(tmp_path, monkeypatch):
  _tree(tmp_path, {"a.txt": "A.\n\nB.", "b.jsonl": json.dumps({"text": "C."})})
  reads = []
  original = pathlib.Path.read_bytes

  def counting(self):
    reads.append(self.name)
    return original(self)

  monkeypatch.setattr(pathlib.Path, "read_bytes", counting)
  assert len(read_documents(tmp_path, chars(16))) == 3
  assert sorted(reads) == ["a.txt", "b.jsonl"]


def test_module_constants_name_the_supported_suffixes():
  assert documents.SUFFIXES == (".jsonl", ".txt", ".md")
  assert documents.MIN_CHARS == 16
