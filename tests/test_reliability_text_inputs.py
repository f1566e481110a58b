"""Text inputs a user gets wrong: each is one clear message naming the file or column and the fix (issue 22)."""

from __future__ import annotations

import json

import pytest

from hf_elsa.data import load_documents


def test_a_binary_file_is_named(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"image\.png.*not UTF-8 text"):
        load_documents([str(path)])


def test_a_latin1_file_is_named_with_the_fix(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"notes\.txt.*not UTF-8.*iconv"):
        load_documents([str(path)])


def test_a_folder_is_not_a_missing_file(tmp_path):
    (tmp_path / "docs").mkdir()
    with pytest.raises(ValueError, match=r"docs.*is a folder"):
        load_documents([str(tmp_path / "docs")])


def test_a_missing_file_is_still_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_documents([str(tmp_path / "nope.txt")])


def test_one_file_as_a_string_is_one_document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("one document")
    assert load_documents(str(path)) == ["one document"]


def test_a_numeric_text_column_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": i, "body": f"row {i}"}) for i in range(4)))
    with pytest.raises(ValueError, match=r"column 'text'.*int.*--dataset_text_field"):
        load_documents(data_files=str(path))
    assert load_documents(data_files=str(path), text_column="body") == [f"row {i}" for i in range(4)]


def test_a_text_column_with_missing_rows_skips_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": None if i == 1 else f"row {i}"}) for i in range(3)))
    assert load_documents(data_files=str(path)) == ["row 0", "row 2"]


def test_bench_inference_on_a_missing_folder_says_so(tmp_path, capsys):
    from hf_elsa.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["bench-inference", str(missing), "--out", str(tmp_path / "new-out")]) == 1
    err = capsys.readouterr().err
    assert "folder not found" in err and "no-such-model" in err and "Repo id" not in err
