"""Small utilities every package shares: atomic writes, file hashing, plain-text tables, interrupts
and the ``knob`` fields that give each setting its one default and range.

Dependency-free (standard library only), so ``crawl/`` (no torch), ``distill/`` (no DVC) and
``pipeline/`` can all import it. Every writer here follows one rule: the bytes go to a temporary
file beside the target, which is renamed into place only when complete, so a kill or a full disk
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "Terminated",
    "atomic_path",
    "format_table",
    "knob",
    "pick",
    "progress_bar",
    "same_as",
    "sha256_file",
    "sigterm_as_interrupt",
    "write_bytes",
    "write_json",
    "write_metrics",
    "write_text",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``, on error
    remove it.

    For writers that need a file name (``np.save``, ``torch.save``): ``with atomic_path(p) as tmp:
    torch.save(obj, tmp)``. The temporary name keeps the suffix, so libraries that add one do not.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """A DVC metrics file: the numbers in ``path`` (what ``dvc metrics show``, ``dvc exp show`` and
    ``dvc metrics diff`` compare), everything else (names, per-class tables) in
    ``<stem>_details.json`` beside it, so the metrics table stays one short row per run."""
    path = Path(path)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_json(path, numbers)
    write_json(path.with_name(f"{path.stem}_details.json"), {k: v for k, v in metrics.items() if k not in numbers})


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def format_table(rows: Sequence[Sequence[Any]], *, rules: Sequence[int] = (1,)) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned.

    ``rules`` lists the row indices before which a dashed line goes (default: under the header;
    a negative index counts from the end, so ``(1, -1)`` also sets off a total row).
    """
    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        return ""
    width = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width, strict=False)))
        for r in cells
    ]
    rule = "  ".join("-" * w for w in width)
    for at in sorted({r % len(lines) if r < 0 else r for r in rules}, reverse=True):
        lines.insert(at, rule)
    return "\n".join(line.rstrip() for line in lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM delivered as an interrupt, so the clean-up path of Ctrl-C runs (the CLI exits 143)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` instead of killing the process on the spot."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on stderr with an ETA, drawn only when stderr is a terminal (quiet in logs and CI)."""
    from tqdm import tqdm  # a dependency of the project, imported only where a bar is drawn

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------------------------
# knobs: each setting's default and range, written once
# --------------------------------------------------------------------------------------------


def knob(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """A dataclass field with its default and allowed range (inclusive unless ``lo_open``).

    The library dataclass that uses a setting declares it once with ``knob``; ``pipeline.config``
    nests that dataclass, or copies the field with ``same_as``, and validates params against the
    range, so no default or range is written twice.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls: type, name: str) -> Any:
    """A field declared exactly like ``cls``'s field ``name``: the same default and range."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    f = fields[name]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def pick(cls: type[T], source: Any, **given: Any) -> T:
    """``cls`` built from ``source``'s attributes of the same names, plus ``given``.

    The adapter from a params section to a library dataclass that the section copies fields from
    with ``same_as``: the names agree by construction, so nothing is copied by hand.
    """
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in given]  # type: ignore[arg-type]
    return cls(**{n: getattr(source, n) for n in names if hasattr(source, n)}, **given)
