"""``params.yaml`` says where it departs from the defaults: every key whose value differs from the
default declared in code has a ``# default: <value>; why`` comment on its line, and every such
comment names the real default (so the file cannot drift from the code)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import SECTIONS, build, load_section

from conftest import REPO

DEFAULT_NOTE = re.compile(r"default: ([^;,]+?|\[[^]]*\])\s*(?:[;,]|$)")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config object (or its defaults) as ``{dotted key: leaf value}``, in params.yaml's layout."""
    if dataclasses.is_dataclass(obj):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        items.update(items.pop("methods", {}))  # distill.<method> sections sit beside the other keys
        obj = items
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: json.loads(json.dumps(obj))}  # tuples -> lists, as YAML reads them


def comment_lines(path: Path) -> dict[str, tuple[int, str]]:
    """``{dotted key: (line number, comment)}`` for every key line of a block-style YAML file."""
    stack: list[tuple[int, str]] = []
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^( *)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        out[".".join(k for _, k in stack)] = (n, comment)
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-4)
    return a == b and type(a) is type(b)


def differences(params: Path) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (params value, default)}`` for every key where the file departs from the code."""
    out = {}
    for name, cls in SECTIONS.items():
        ours = flatten(load_section(params, name, cls), f"{name}.")
        default = flatten(build(cls, {}, name), f"{name}.")
        out.update({k: (v, default[k]) for k, v in ours.items() if not same(v, default[k])})
    return out


def line_of(key: str, lines: dict[str, tuple[int, str]]) -> tuple[int, str]:
    """The line that sets ``key``, or the one that sets its enclosing inline mapping."""
    while key not in lines and "." in key:
        key = key.rsplit(".", 1)[0]
    return lines[key]


def test_every_departure_from_a_default_is_commented_with_the_default() -> None:
    params = REPO / "params.yaml"
    lines = comment_lines(params)
    missing = []
    for key, (value, default) in sorted(differences(params).items()):
        n, comment = line_of(key, lines)
        note = DEFAULT_NOTE.search(comment)
        if note is None:
            missing.append(f"params.yaml:{n}: {key}: {value!r} (default {default!r}) needs '# default: ...; why'")
    assert not missing, "\n".join(missing)


def test_every_default_comment_names_the_real_default() -> None:
    params = REPO / "params.yaml"
    defaults = {}
    for name, cls in SECTIONS.items():
        defaults.update(flatten(build(cls, {}, name), f"{name}."))
    stale = []
    for key, (n, comment) in comment_lines(params).items():
        note = DEFAULT_NOTE.search(comment)
        if note is None or key not in defaults:
            continue
        if not same(json.loads(json.dumps(yaml.safe_load(note.group(1)))), defaults[key]):
            stale.append(f"params.yaml:{n}: {key}: the comment says default {note.group(1)}, it is {defaults[key]!r}")
    assert not stale, "\n".join(stale)


def test_the_check_sees_a_departure(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("distill:\n  epochs: 7   # a short run\n  lr: 0.05\n")
    diff = differences(p)
    assert diff == {"distill.epochs": (7, 30)}
    assert DEFAULT_NOTE.search(line_of("distill.epochs", comment_lines(p))[1]) is None
