"""Class files, query templates, synonyms and shards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crawl.classes import (
    ClassFileError,
    build_queries,
    parse_classes,
    read_classes,
    read_synonyms,
    select_shard,
    slugify,
)


def write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "classes.txt"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"# only\n  # comments\n"])
def test_empty_or_comment_only_is_an_error(tmp_path: Path, data: bytes) -> None:
    p = write(tmp_path, data)
    with pytest.raises(ClassFileError, match=f"{p}: no classes"):
        read_classes(p)


def test_duplicates_after_normalisation_are_listed(tmp_path: Path) -> None:
    p = write(tmp_path, b"Shirt\ncoat\n  SHIRT \nCoat\nBag\nankle  boot\nAnkle Boot\n")
    with pytest.raises(ClassFileError, match="duplicate") as e:
        read_classes(p)
    msg = str(e.value)
    assert "line 3 'SHIRT' repeats line 1" in msg and "line 4 'Coat' repeats line 2" in msg
    assert "line 7 'Ankle Boot' repeats line 6" in msg


def test_bom_crlf_spaces_and_blank_lines_are_normalised(tmp_path: Path) -> None:
    p = write(tmp_path, "\ufeffShirt  \r\n\r\n  Coat\r\n# a comment\r\nBag".encode())
    assert [c.name for c in read_classes(p)] == ["Shirt", "Coat", "Bag"]
    assert [c.index for c in read_classes(p)] == [0, 1, 2]


def test_odd_names_are_accepted_with_safe_unique_slugs(tmp_path: Path) -> None:
    odd = ["T-shirt/top", "../../etc", "a\x00b", "x" * 300, "👟 sneaker", "R&B", "C#", "C++", "a/b", "a b"]
    p = write(tmp_path, "\n".join(odd).encode())
    classes = read_classes(p)
    assert [c.name for c in classes] == odd  # original names kept verbatim
    slugs = [c.slug for c in classes]
    assert len(set(slugs)) == len(slugs)
    for s in slugs:
        assert s.replace("-", "").isalnum() and s.isascii() and len(s) <= 49
        assert "/" not in s and ".." not in s and "\x00" not in s


@pytest.mark.parametrize(
    ("data", "byte", "offset"),
    [
        (b"Shirt\nCoat\nCaf\xe9\nBag\n", 0xE9, 14),  # Latin-1
        (b"\xef\xbb\xbfShirt\r\nCoat\r\nCaf\xe9\r\n", 0xE9, 19),  # a BOM counts in the offset, not the lines
        (b"Shirt\rCoat\rCaf\xe9", 0xE9, 14),  # old Mac line ends
        (b"Shirt\nCoat\nBa\xffg\n", 0xFF, 13),
    ],
    ids=["latin-1", "bom-crlf", "cr", "0xff"],
)
def test_non_utf8_names_file_line_byte_and_offset(tmp_path: Path, data: bytes, byte: int, offset: int) -> None:
    p = write(tmp_path, data)
    with pytest.raises(ClassFileError) as e:
        read_classes(p)
    assert str(e.value) == f"{p}:3: not valid UTF-8 (byte 0x{byte:02x} at offset {offset}); save the file as UTF-8"


def test_a_utf8_bom_is_tolerated_but_not_part_of_the_first_name(tmp_path: Path) -> None:
    p = write(tmp_path, "\ufeffCafé\nBag\n".encode())
    assert [c.name for c in read_classes(p)] == ["Café", "Bag"]
    syn = tmp_path / "syn.tsv"
    syn.write_bytes("\ufeffCafé\tcoffee shop\n".encode())
    assert read_synonyms(syn, read_classes(p)) == {"Café": ["coffee shop"], "Bag": []}


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("utf-16", "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
        ("utf-16-le", "the file looks like UTF-16 (every other byte is zero); save it as UTF-8"),
        ("utf-16-be", "the file looks like UTF-16 (every other byte is zero); save it as UTF-8"),
        ("utf-32", "the file is UTF-32 (it starts with a UTF-32 byte-order mark); save it as UTF-8"),
    ],
)
def test_a_utf16_or_utf32_file_is_named_as_such(tmp_path: Path, encoding: str, message: str) -> None:
    p = write(tmp_path, "Shirt\r\nCoat\r\nBag\r\n".encode(encoding))
    with pytest.raises(ClassFileError) as e:
        read_classes(p)
    assert str(e.value) == f"{p}: {message}"


def test_a_synonyms_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    syn = tmp_path / "syn.tsv"
    syn.write_bytes(b"Bag\thandbag\nBag\tsac \xe0 main\n")
    with pytest.raises(ClassFileError, match=f"^{re.escape(str(syn))}:2: not valid UTF-8 \\(byte 0xe0 at offset 20\\)"):
        read_synonyms(syn, parse_classes("Bag\n"))


def test_the_cli_exits_2_with_the_encoding_message(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    p = write(tmp_path, b"Shirt\nCoat\nCaf\xe9\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"crawl:\n  classes: {p}\n  out_dir: {tmp_path / 'crawl'}\n  progress: false\n")
    result = CliRunner().invoke(app, ["crawl", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert f"error: {p}:3: not valid UTF-8 (byte 0xe9 at offset 14); save the file as UTF-8" in result.output
    assert not (tmp_path / "crawl").exists()


def test_missing_class_file(tmp_path: Path) -> None:
    with pytest.raises(ClassFileError, match="class file not found"):
        read_classes(tmp_path / "nope.txt")


def test_slug_is_stable() -> None:
    assert slugify("T-shirt/top") == slugify("T-shirt/top")
    assert slugify("T-shirt/top").startswith("t-shirt-top-")


def test_queries_from_templates_and_synonyms(tmp_path: Path) -> None:
    classes = parse_classes("Sneaker\nBag\n")
    syn = tmp_path / "syn.tsv"
    syn.write_text("sneaker\ttrainer\nSneaker\tTrainer\nBag\thandbag\n")
    synonyms = read_synonyms(syn, classes)
    assert synonyms == {"Sneaker": ["trainer"], "Bag": ["handbag"]}
    assert build_queries("Sneaker", ["{name}", "{name} photo"], synonyms["Sneaker"]) == [
        "Sneaker",
        "Sneaker photo",
        "trainer",
        "trainer photo",
    ]
    syn.write_text("Hat\tcap\n")
    with pytest.raises(ClassFileError, match="line 1: 'Hat' is not in the class list"):
        read_synonyms(syn, classes)


def test_shards_partition_the_class_list() -> None:
    classes = parse_classes("\n".join(f"c{i}" for i in range(10)))
    shards = [select_shard(classes, i, 3) for i in range(3)]
    assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in classes)
    assert [c.index for c in shards[1]] == [1, 4, 7]
