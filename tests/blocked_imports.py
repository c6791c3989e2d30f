"""Run kd3 as on the GPU machine, whose python lacks the crawl- and DVC-only packages.

``blocked_env(tmp)`` returns an environment whose Python processes (and their children) cannot
import imagehash, icrawler or dvc: a ``sitecustomize`` on ``PYTHONPATH`` puts a meta-path finder
first that raises ``ImportError`` for them, as a missing package would.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCKED = ("imagehash", "icrawler", "dvc")

SITECUSTOMIZE = f"""
import importlib.abc
import sys


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def blocked_env(folder: Path) -> dict[str, str]:
    """``os.environ`` plus a ``PYTHONPATH`` entry whose ``sitecustomize`` blocks ``BLOCKED``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
