"""Stage ``report``: one self-contained HTML page that tells a run's story, stage by stage.

It reads what the other stages wrote, where ``params.yaml`` says they wrote it, and writes
``report.out_dir/index.html``: every picture inlined as a PNG, no scripts, no fonts or styles
from the network, so the page opens offline, can be mailed as one file and prints. A stage that
has not run yet gets a section that says so and which command runs it.

Sections, in the order the data flows: the run at a glance, the crawl (per class, per engine,
failure reasons), clean (what it dropped and why, with its contact sheets), the teacher's view of
the web pool (the label stage's transfer diagnostics), training (loss terms, validation accuracy
and the selection over the epochs), accuracy (teacher and student, per class, confusion matrices
by class name), the student (size, CPU speed, export formats, model card) and every setting with
where its value came from.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import html
import io
import json
import logging
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from kd3util import atomic_path
from pipeline import artifacts
from pipeline.config import SECTIONS, ConfigError, ReportConfig, _section, build, read_params

log = logging.getLogger(__name__)

PAGE = "index.html"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222}
body{max-width:1100px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-bottom:.3em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4;text-align:left}
td:first-child{text-align:left}
td.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em;min-width:9em}
.card b{display:block;font-size:1.5em}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5em 1em;margin:.5em 0}
.missing{color:#777;font-style:italic}
.src-default{color:#888}
figure{margin:.8em 0;break-inside:avoid}
.pair{display:flex;flex-wrap:wrap;gap:1em}
.pair figure{flex:1 1 420px}
figcaption{color:#555;font-size:12px}
img{max-width:100%;height:auto;border:1px solid #eee}
nav a{margin-right:1em}
pre{background:#f8f8f8;padding:.6em;overflow-x:auto;font-size:12px}
@media print{nav{display:none}
h2{break-before:auto}
section{break-inside:auto}
"""


class Missing(Exception):
    """A section's inputs do not exist yet: the message says which stage makes them."""


# --------------------------------------------------------------------------------------------
# small HTML helpers (every value from a file is escaped)
# --------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[Any]], left: tuple[int, ...] = (0,)) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=l' if i in left else ''}>{esc(fmt(c))}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = esc(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def cards(items: list[tuple[str, Any]]) -> str:
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{esc(fmt(v))}</b>{esc(k)}</div>' for k, v in items)
        + "</div>"
    )


def figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def subplots(width: float = 7.0, height: float = 3.2, **kw: Any) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display: the page's pictures are drawn into memory
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), **kw)


def read_json(path: Path, stage: str) -> Any:
    if not path.is_file():
        raise Missing(f"{path} does not exist yet: run `kd3 {stage}` (or `dvc repro {stage}`)")
    return artifacts.read_json(path, "file", f"rerun `kd3 {stage}`")


# --------------------------------------------------------------------------------------------
# the sections
# --------------------------------------------------------------------------------------------


def glance(cfg: dict[str, Any]) -> str:
    metrics = Path(cfg["evaluate"].out_dir)
    parts = []
    teacher = _maybe(lambda: read_json(Path(cfg["teacher"].out_dir) / "teacher.json", "teacher"))
    if teacher:
        parts.append(
            f"<p>Teacher <b>{esc(teacher.get('arch') or 'checkpoint')}</b> "
            f"({esc(teacher.get('checkpoint') or 'the demo teacher')}, "
            f"sha256 {esc(str(teacher.get('sha256'))[:12])}…), "
            f"{len(teacher.get('classes', []))} classes, input {esc(teacher.get('input_size'))} px.</p>"
        )
    t = _maybe(lambda: read_json(metrics / "teacher.json", "evaluate")) or {}
    s = _maybe(lambda: read_json(metrics / "student.json", "evaluate")) or {}
    sd = _maybe(lambda: read_json(metrics / "student_details.json", "evaluate")) or {}
    items: list[tuple[str, Any]] = []
    if "teacher_accuracy" in t:
        items.append(("teacher accuracy", t["teacher_accuracy"]))
    if "student_accuracy" in s:
        items.append((f"student accuracy ({sd.get('method', '?')}, {sd.get('student', '?')})", s["student_accuracy"]))
        if t.get("teacher_accuracy"):
            items.append(("student / teacher", round(s["student_accuracy"] / t["teacher_accuracy"], 3)))
    for key, label in (
        ("agreement_eval", "agreement with the teacher"),
        ("agreement_heldout_web", "agreement on held-out web images"),
    ):
        if key in s:
            items.append((label, s[key]))
    if not parts and not items:
        raise Missing("no stage has run yet: `dvc repro` runs them all")
    return "".join(parts) + cards(items)


def crawl(cfg: dict[str, Any]) -> str:
    folder = Path(cfg["crawl"].out_dir)
    rep = read_json(folder / "report.json", "crawl")
    rows, failed_total = [], Counter[str]()
    for c in rep["classes"]:
        failed = Counter(c.get("failed", {}))
        failed_total.update(failed)
        reasons = ", ".join(f"{k} {v}" for k, v in failed.most_common(3))
        rows.append(
            [
                c["name"],
                sum(c.get("candidates", {}).values()),
                c.get("downloaded", 0),
                sum(failed.values()),
                reasons,
                sum(c.get("deferred", {}).values()),
            ]
        )
    out = cards(
        [
            ("images downloaded", rep.get("downloaded")),
            ("classes", len(rows)),
            ("engines", ", ".join(rep.get("engines", []))),
            ("seconds", rep.get("seconds")),
        ]
    )
    out += "<h3>Per class</h3>" + table(
        ["class", "candidates", "downloaded", "failed", "top failure reasons", "deferred"], rows, left=(0, 4)
    )
    engines: dict[str, Counter[str]] = {}
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        with open(manifest, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: the crawl stage counts it in its own report
                engines.setdefault(str(row.get("engine")), Counter())[
                    row.get("reason") or row.get("status") or "?"
                ] += 1
    if engines:
        out += "<h3>Per engine</h3>" + table(
            ["engine", "ok", "failed", "reasons"],
            [
                [e, n["ok"], sum(n.values()) - n["ok"], ", ".join(f"{k} {v}" for k, v in n.most_common() if k != "ok")]
                for e, n in engines.items()
            ],
            left=(0, 3),
        )
    if failed_total:
        fig, ax = subplots(7, 0.35 * len(failed_total) + 0.8)
        names, counts = zip(*failed_total.most_common(), strict=True)
        ax.barh(names[::-1], counts[::-1], color="#c0504d")
        ax.set_xlabel("requests")
        out += image(figure_png(fig), "why downloads failed (all classes)")
    problems = rep.get("problems") or []
    out += "".join(f'<div class="warn">{esc(p)}</div>' for p in problems)
    return out


def clean(cfg: dict[str, Any]) -> str:
    folder = Path(cfg["clean"].out_dir)
    rep = read_json(folder / "report.json", "clean")
    out = cards(
        [
            ("objects", rep.get("objects")),
            ("kept", rep.get("kept")),
            ("dropped", rep.get("dropped")),
            ("near-duplicate clusters", rep.get("near_duplicate_clusters")),
        ]
    )
    reasons = sorted({r for c in rep.get("classes", []) for r in c.get("dropped", {})})
    rows = [
        [c["name"], c.get("objects"), c.get("kept"), *(c.get("dropped", {}).get(r, 0) for r in reasons)]
        for c in rep.get("classes", [])
    ]
    out += table(["class", "objects", "kept", *(f"dropped: {r}" for r in reasons)], rows)
    for w in (rep.get("warnings") or {}).values():
        out += f'<div class="warn">{esc(w)}</div>'
    sheets = sorted((folder / "sheets").glob("*.png"), key=lambda p: (p.name != "duplicates.png", p.name))
    for p in sheets:
        what = (
            "near-duplicate clusters (the image kept is outlined)"
            if p.name == "duplicates.png"
            else p.stem.replace("_", " ")
        )
        out += image(p.read_bytes(), f"{what} ({p.name})")
    return out


def teacher_view(cfg: dict[str, Any]) -> str:
    rep = read_json(Path(cfg["label"].out_dir) / "report.json", "label")
    tr = rep.get("transfer", {})
    out = cards(
        [
            ("web images labelled", rep.get("images")),
            ("teacher–query agreement", tr.get("agreement")),
            ("by chance", tr.get("chance_agreement")),
            ("kappa", tr.get("kappa")),
            ("median confidence", rep.get("confidence_quantiles", {}).get("50")),
        ]
    )
    regime = tr.get("regime")
    if regime:  # the annotator model's verdict: does the teacher transfer to these images?
        out += f'<div class="warn"><b>regime: {esc(regime.get("code"))}</b>. {esc(regime.get("message"))}</div>'
    out += "".join(
        f'<div class="warn"><b>{esc(w.get("code"))}</b>: {esc(w.get("message"))}</div>' for w in tr.get("warnings", [])
    )
    per = tr.get("per_class", [])
    if per:
        total = max(sum(p.get("crawled") or 0 for p in per), 1)
        estimates = [
            ("teacher_accuracy_est", "teacher right (est.)"),
            ("query_accuracy_est", "query right (est.)"),
            ("junk_share_est", "junk among crawled (est.)"),
        ]
        shown = [(k, h) for k, h in estimates if any(k in p for p in per)]
        out += table(
            [
                "class",
                "crawled",
                "crawled share",
                "teacher's share",
                "teacher agrees with query",
                "mean confidence",
                *(h for _, h in shown),
            ],
            [
                [
                    p["class"],
                    p.get("crawled"),
                    round((p.get("crawled") or 0) / total, 4),
                    p.get("teacher_share"),
                    p.get("agreement"),
                    p.get("confidence"),
                    *(p.get(k) for k, _ in shown),
                ]
                for p in per
            ],
        )
        if shown:
            out += (
                '<p class="sub">est.: the annotator model fitted on the pool, which treats the teacher and the '
                "crawl query as two noisy labels of each image (docs/method.md).</p>"
            )
        fig, ax = subplots(7.5, 3.2)
        x = np.arange(len(per))
        ax.bar(x - 0.2, [(p.get("crawled") or 0) / total for p in per], 0.4, label="crawled for the class")
        ax.bar(x + 0.2, [p.get("teacher_share") or 0 for p in per], 0.4, label="teacher predicts the class")
        _class_ticks(ax, [p["class"] for p in per])
        ax.set_ylabel("share of the web pool")
        ax.legend(fontsize=8)
        out += image(figure_png(fig), "where the teacher puts the web pool, against what was crawled for each class")
    hist = rep.get("confidence_histogram")
    if hist:
        fig, ax = subplots(6, 2.6)
        edges = np.linspace(0, 1, len(hist) + 1)
        ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4f81bd", edgecolor="white")
        ax.set_xlabel("teacher confidence (max softmax)")
        ax.set_ylabel("web images")
        out += image(figure_png(fig), "the teacher's confidence on the web pool")
    truth = rep.get("demo_truth")
    if truth:
        out += "<h3>Against the demo world's truth (a report only; training never reads it)</h3>"
        out += table(["measure", "value"], [[k, v] for k, v in truth.items() if not isinstance(v, (dict, list))])
    return out


def training(cfg: dict[str, Any]) -> str:
    folder = Path(cfg["distill"].out_dir)
    rep = read_json(folder / "report.json", "distill")
    hist = rep.get("history") or []
    g = {k: esc(fmt(rep.get(k))) for k in ("method", "student", "train_images", "epochs", "device", "train_seconds")}
    out = (
        f"<p>{g['method']} → {g['student']}, {g['train_images']} training images, {g['epochs']} epochs on "
        f"{g['device']}, {g['train_seconds']} s ({esc(fmt(rep.get('images_per_second')))} images/s).</p>"
    )
    if rep.get("describe"):
        out += f"<pre>{esc(rep['describe'])}</pre>"
    if not hist:
        return out
    epochs = [r["epoch"] for r in hist]
    skip = {
        "epoch",
        "lr",
        "selected",
        "selected_fraction",
        "selection_seconds",
        "selection_precision",
        "selected_junk_fraction",
        "skipped_steps",
        "train_seconds",
        "images_per_second",
        "val_accuracy",
    }
    terms = [k for k in hist[0] if k not in skip and isinstance(hist[0][k], (int, float))]
    fig, axes = subplots(11, 3.2, ncols=2)
    for k in terms:
        axes[0].plot(epochs, [r.get(k, np.nan) for r in hist], marker=".", label=k, linewidth=2 if k == "loss" else 1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_title("loss terms (per image, log scale)", fontsize=10)
    axes[0].legend(fontsize=7)
    if any("val_accuracy" in r for r in hist):
        axes[1].plot(epochs, [r.get("val_accuracy", np.nan) for r in hist], marker="o", color="#2e7d32")
        axes[1].set_title("validation accuracy", fontsize=10)
    else:
        axes[1].set_title("no validation set (distill.eval)", fontsize=10)
    axes[1].set_xlabel("epoch")
    out += image(figure_png(fig), "training curves")
    if any(r.get("selected_fraction", 1) < 1 or "selection_precision" in r for r in hist):
        fig, ax = subplots(7, 2.8)
        ax.plot(epochs, [r.get("selected_fraction", np.nan) for r in hist], marker=".", label="selected fraction")
        if any("selection_precision" in r for r in hist):
            ax.plot(
                epochs,
                [r.get("selection_precision", np.nan) for r in hist],
                marker=".",
                label="pseudo-label precision of the selected (demo truth)",
            )
            ax.plot(
                epochs,
                [r.get("selected_junk_fraction", np.nan) for r in hist],
                marker=".",
                label="junk among the selected (demo truth)",
            )
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        off = all(r.get("selected_fraction", 1) == 1 for r in hist)
        out += image(
            figure_png(fig), "no selection: every image trains" if off else "what the selection kept over the epochs"
        )
    for name, what in (
        ("selection_kept.png", "kept by the selection in the last epoch"),
        ("selection_dropped.png", "dropped by the selection in the last epoch"),
    ):
        p = folder / "sheets" / name
        if p.is_file():
            out += image(p.read_bytes(), f"{what}, per pseudo-class ({name})")
    return out


def accuracy(cfg: dict[str, Any]) -> str:
    metrics = Path(cfg["evaluate"].out_dir)
    t = read_json(metrics / "teacher.json", "evaluate")
    td = _maybe(lambda: read_json(metrics / "teacher_details.json", "evaluate")) or {}
    s = _maybe(lambda: read_json(metrics / "student.json", "evaluate")) or {}
    sd = _maybe(lambda: read_json(metrics / "student_details.json", "evaluate")) or {}
    if not td.get("eval_set") and "teacher_accuracy" not in t:
        out = (
            '<p class="missing">No labelled set of the original distribution (evaluate.eval_dir): '
            "accuracy was not measured.</p>"
        )
    else:
        where = f"{esc(td.get('eval_set'))}, images {esc(td.get('eval_range'))}"
        out = f"<p>On {where} ({fmt(t.get('eval_images'))} images).</p>"
    out += cards([(k.replace("_", " "), v) for k, v in {**t, **s}.items() if "accuracy" in k or "agreement" in k])
    tp, sp = td.get("teacher_per_class") or {}, sd.get("student_per_class") or {}
    if tp:
        out += table(
            ["class", "teacher", "student", "student − teacher"],
            [[c, v, sp.get(c), None if c not in sp else round(sp[c] - v, 4)] for c, v in tp.items()],
        )
    pred_file = metrics / "predictions.csv"
    if pred_file.is_file():
        with open(pred_file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        classes = list(tp) or sorted({r["actual"] for r in rows})
        pair = [
            image(
                _confusion_png(rows, who, classes),
                f"{who}: rows are the true class, columns the prediction; shade: share of the row",
            )
            for who in ("teacher", "student")
            if rows and who in rows[0]
        ]
        out += f'<div class="pair">{"".join(pair)}</div>'
    return out


def student(cfg: dict[str, Any]) -> str:
    folder = Path(cfg["distill"].out_dir)
    meta = read_json(folder / "student.json", "distill")
    s = _maybe(lambda: read_json(Path(cfg["evaluate"].out_dir) / "student.json", "evaluate")) or {}
    out = cards(
        [
            ("parameters", s.get("parameters")),
            ("student.pt bytes", s.get("weights_bytes")),
            ("CPU latency, 1 image (ms)", s.get("cpu_latency_ms")),
            ("CPU images/s, batches of 64", s.get("cpu_images_per_second")),
        ]
    )
    files = [[p.name, p.stat().st_size] for p in sorted(folder.glob("student.*")) if p.is_file()]
    out += "<h3>Files</h3>" + table(["file", "bytes"], files)
    formats = meta.get("formats") or {}
    skipped = [
        [k, v.get("skipped") or v.get("failed")]
        for k, v in formats.items()
        if isinstance(v, dict) and ("skipped" in v or "failed" in v)
    ]
    if skipped:
        out += table(["format", "not written because"], skipped, left=(0, 1))
    card = folder / "model_card.md"
    if card.is_file():
        out += f"<h3>Model card</h3><pre>{esc(card.read_text(encoding='utf-8'))}</pre>"
    return out


def settings(cfg: dict[str, Any], params_path: Path, raw: dict[str, Any]) -> str:
    rows = []
    for name, obj in cfg.items():
        given = _flatten(raw.get(name) or {})
        try:
            defaults = _flatten(_as_dict(build(type(obj), {}, name)))
        except ConfigError:  # a section with a required key has no all-default form
            defaults = {}
        for key, value in _flatten(_as_dict(obj)).items():
            default = defaults.get(key)
            if key in given:
                source = "params.yaml" + ("" if value == default else f" (default: {json.dumps(default)})")
            else:
                source = "default"
            rows.append([f"{name}.{key}", json.dumps(value, ensure_ascii=False), source])
    return (
        f"<p>From {esc(params_path)} as it is now; a stage run with <code>--set</code> is not reflected here.</p>"
        + table(["setting", "value", "source"], rows, left=(0, 1, 2))
    )


# --------------------------------------------------------------------------------------------


SECTIONS_IN_ORDER: list[tuple[str, str, Callable[..., str]]] = [
    ("glance", "The run at a glance", glance),
    ("crawl", "1. Crawl: what the web gave", crawl),
    ("clean", "2. Clean: what was dropped, and why", clean),
    ("teacher", "3. The teacher's view of the web pool", teacher_view),
    ("training", "4. Training", training),
    ("accuracy", "5. Accuracy", accuracy),
    ("student", "6. The student you ship", student),
]


def run(cfg: ReportConfig, params_path: str | Path = "params.yaml") -> Path:
    params_path = Path(params_path)
    data = read_params(params_path)
    stage_cfg: dict[str, Any] = {name: _section(data, params_path, name, cls) for name, cls in SECTIONS.items()}
    body, nav, missing = [], [], 0
    every_setting = ("settings", "7. Every setting", lambda c: settings(c, params_path, data))
    for key, title, fn in [*SECTIONS_IN_ORDER, every_setting]:
        try:
            content = fn(stage_cfg)
        except Missing as e:
            content, missing = f'<p class="missing">{esc(e)}</p>', missing + 1
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged file costs its section, not the page
            log.warning("report: section %r: %s", key, e)
            content, missing = f'<p class="missing">could not read this section: {esc(e)}</p>', missing + 1
        nav.append(f'<a href="#{key}">{esc(title.split(": ")[0])}</a>')
        body.append(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>')
    title = cfg.title or f"kd3 run: {Path.cwd().name}"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
        f'<h1>{esc(title)}</h1><p class="sub">kd3 {esc(_version())}, written {when}</p><nav>{"".join(nav)}</nav>'
        + "".join(body)
        + "</body></html>"
    )
    out = Path(cfg.out_dir) / PAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report: %s (%d KiB, %d of %d sections without data)", out, len(page) // 1024, missing, len(body))
    return out


def _maybe(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (Missing, OSError, ValueError):
        return None


def _class_ticks(ax: Any, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        [n[:18] for n in names],
        rotation=45 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize=8,
    )


def _confusion_png(rows: list[dict[str, str]], who: str, classes: list[str]) -> bytes:
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    for r in rows:
        if r["actual"] in index and r[who] in index:
            cm[index[r["actual"]], index[r[who]]] += 1
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * k + 2), 14.0)
    fig, ax = subplots(side, side * 0.85)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_yticks(range(k))
    ax.set_yticklabels([c[:18] for c in classes], fontsize=8)
    _class_ticks(ax, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return figure_png(fig)


def _as_dict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    d.update(d.pop("methods", {}))  # distill.kd3.x, as params.yaml writes it
    return d


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _version() -> str:
    try:
        return version("kd3")
    except PackageNotFoundError:
        return "(not installed)"


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH (Debian's ``chromium`` package), or None."""
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def browser(page: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``page`` (``--dump-dom``, ``--screenshot=...``) in a throwaway profile."""
    exe = find_browser()
    if exe is None:
        raise RuntimeError("no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="kd3-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespaces to sandbox into
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1600) -> None:
    """A PNG of the page's top ``height`` pixels, as a browser renders it."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        done = browser(page, f"--screenshot={tmp.resolve()}", f"--window-size={width},{height}", "--hide-scrollbars")
        if done.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"chromium could not screenshot {page}: {done.stderr.strip()[-500:]}")
