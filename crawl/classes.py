"""Class lists: parse a user's ``classes.txt`` into normalised names with filesystem-safe slugs.

Rules: a UTF-8 BOM, CRLF line ends, surrounding whitespace and blank
lines are normalised away; lines whose first non-blank character is ``#`` are comments; an empty
list, duplicates after normalisation (NFKC, case, inner whitespace) and non-UTF-8 bytes are errors
naming the file and line (a UTF-16 or UTF-32 file is named as such). Any other character is
accepted (``/``, ``..``, ``&``, emoji, 300 characters): the name is kept verbatim in metadata and
is never used raw as a path; ``slug`` is.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

MAX_CLASS_FILE_BYTES = 10_000_000


class ClassFileError(ValueError):
    """A class file that cannot be used; the message names the file (and line where there is one)."""


@dataclass(frozen=True)
class ClassName:
    """One class: ``index`` is its position in the file (= the teacher's output order)."""

    index: int
    name: str
    slug: str


def normalise(name: str) -> str:
    """The key two names are compared by: NFKC, case-folded, inner whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def slugify(name: str) -> str:
    """A safe directory name: ASCII letters/digits/``-`` (max 40) plus 8 hex of the name's sha256.

    The hash keeps two names that slug alike (``a/b`` and ``a b``) apart.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9]+", "-", ascii_name).strip("-").lower()[:40] or "class"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}"


def parse_classes(text: str, source: str = "<classes>") -> list[ClassName]:
    """Parse class-file text (already decoded) into ``ClassName``s."""
    text = text.removeprefix("\ufeff")
    seen: dict[str, int] = {}
    names: list[tuple[str, int]] = []
    duplicates: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        key = normalise(name)
        if key in seen:
            duplicates.append(f"line {lineno} {name!r} repeats line {seen[key]}")
            continue
        seen[key] = lineno
        names.append((name, lineno))
    if duplicates:
        raise ClassFileError(f"{source}: duplicate class names: " + "; ".join(duplicates))
    if not names:
        raise ClassFileError(f"{source}: no classes (the file is empty or only comments)")
    return [ClassName(i, name, slugify(name)) for i, (name, _) in enumerate(names)]


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16 LE, whose BOM it starts with
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def decode_text(data: bytes, path: Path) -> str:
    """UTF-8 text of a file the user wrote, without a BOM; errors give ``path:line`` and the byte.

    A text editor's "Unicode" is often UTF-16, whose ASCII is valid UTF-8 with a NUL after every
    letter: such a file is refused by name rather than read as names full of NULs.
    """
    for bom, codec in _WIDE_BOMS:
        if data.startswith(bom):
            raise ClassFileError(
                f"{path}: the file is {codec} (it starts with a {codec} byte-order mark); save it as UTF-8"
            )
    if len(data) >= 4 and max(data[0::2].count(0), data[1::2].count(0)) > len(data) // 4:
        raise ClassFileError(f"{path}: the file looks like UTF-16 (every other byte is zero); save it as UTF-8")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        # numbered as the parsers number lines (str.splitlines), the BOM included in the offset
        line = len((data[: e.start].decode("utf-8") + "x").splitlines())
        raise ClassFileError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None


def read_classes(path: str | Path) -> list[ClassName]:
    """Read and parse a class file; errors name the path (and the line for bad UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ClassFileError(f"{p}: class file not found")
    if p.stat().st_size > MAX_CLASS_FILE_BYTES:
        raise ClassFileError(f"{p}: class file larger than {MAX_CLASS_FILE_BYTES} bytes")
    return parse_classes(decode_text(p.read_bytes(), p), str(p))


def read_synonyms(path: str | Path, classes: list[ClassName]) -> dict[str, list[str]]:
    """Optional synonyms TSV: ``class name<TAB>synonym`` per line -> {class name: [synonyms]}."""
    p = Path(path)
    if not p.is_file():
        raise ClassFileError(f"{p}: synonyms file not found")
    by_key = {normalise(c.name): c.name for c in classes}
    out: dict[str, list[str]] = {c.name: [] for c in classes}
    for lineno, line in enumerate(decode_text(p.read_bytes(), p).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise ClassFileError(f"{p}: line {lineno}: expected 'class<TAB>synonym'")
        cls = by_key.get(normalise(parts[0]))
        if cls is None:
            raise ClassFileError(f"{p}: line {lineno}: {parts[0].strip()!r} is not in the class list")
        syn = parts[1].strip()
        if normalise(syn) not in {normalise(s) for s in out[cls]}:
            out[cls].append(syn)
    return out


def build_queries(name: str, templates: list[str], synonyms: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    """Every template applied to the name and each synonym, in order, without repeats."""
    out: list[str] = []
    for term in [name, *synonyms]:
        for t in templates:
            q = t.format(name=term)
            if q not in out:
                out.append(q)
    return out


def select_shard(classes: list[ClassName], index: int, count: int) -> list[ClassName]:
    """Classes whose position modulo ``count`` equals ``index`` (``--shard index/count``)."""
    return [c for c in classes if c.index % count == index]
