"""The crawl stage's store: its manifest and the class list it was crawled for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd3util import write_json
from pipeline.artifacts import ArtifactError, read_json


@dataclass(frozen=True)
class CrawlStore:
    """``kd3 crawl``: the content-addressed store, its manifest and the class list it was crawled for."""

    dir: Path
    classes: tuple[str, ...]

    HINT = "run kd3 crawl first"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.jsonl"

    @classmethod
    def load(cls, folder: str | Path) -> CrawlStore:
        folder = Path(folder)
        if not (folder / "manifest.jsonl").is_file():
            raise ArtifactError(f"{folder / 'manifest.jsonl'}: no crawl manifest ({cls.HINT})")
        raw = read_json(folder / "classes.json", "crawl class list", cls.HINT)
        try:
            names = tuple(str(c["name"]) for c in raw)
        except (TypeError, KeyError):
            raise ArtifactError(f"{folder / 'classes.json'}: damaged crawl class list ({cls.HINT})") from None
        return cls(folder, names)

    @staticmethod
    def save_classes(folder: str | Path, classes: Sequence[Any]) -> None:
        """``classes``: objects with ``index``, ``name`` and ``slug`` (``crawl.classes.ClassName``)."""
        write_json(Path(folder) / "classes.json", [{"index": c.index, "name": c.name, "slug": c.slug} for c in classes])
