"""Stage ``label``: teacher pseudo-labels (float16 logits, confidence, argmax) for every clean image.

Outputs in ``label.out_dir``: ``logits.npy`` (N, K) float16, row i = row i of the clean array;
``report.json`` (per-class counts, confidence quantiles, images/s, the transfer diagnostics with
the annotator model's estimates and regime, and, in the demo, accuracy against the world's truth:
a report only, training never reads it); ``confidence.png``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.data import resolve_device
from distill.label import predict, softmax, transfer_diagnostics
from distill.plots import bar_chart
from kd3util import format_table
from pipeline.artifacts import check_classes
from pipeline.artifacts.clean import CleanSet, KeptImage
from pipeline.artifacts.label import PseudoLabels
from pipeline.artifacts.teacher import TeacherRecord
from pipeline.artifacts.world import WorldTruth
from pipeline.config import LabelConfig

log = logging.getLogger(__name__)


def run(cfg: LabelConfig) -> dict[str, Any]:
    record = TeacherRecord.load(cfg.teacher_dir)
    clean = CleanSet.load(cfg.clean_dir)
    check_classes(record.classes, clean.classes, f"the teacher ({cfg.teacher_dir})", f"the crawl ({clean.dir})")
    classes = record.classes
    queries = clean.query_classes(classes)
    crawled = np.bincount(queries[queries >= 0], minlength=len(classes))
    if (crawled == 0).any():
        empty = [repr(c) for c, n in zip(classes, crawled, strict=True) if n == 0]
        raise ValueError(
            f"{clean.dir}: no clean images were crawled for the teacher's class(es) {', '.join(empty)}; "
            "crawl them (kd3 crawl) or check the class names"
        )
    teacher = record.load_teacher()
    images = clean.images
    device = resolve_device(cfg.device)
    teacher.to(device)
    bar = tqdm(
        total=len(images), desc="label", unit="img", file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10
    )
    t0 = time.time()
    logits = predict(
        teacher,
        images,
        input_size=record.input_size,
        in_chans=record.in_chans,
        batch_size=cfg.batch_size,
        device=device,
        progress=bar.update,
    )
    seconds = time.time() - t0
    bar.close()
    if len(images) == 0:
        logits = np.zeros((0, len(classes)), dtype=np.float32)
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        first = clean.kept[int(np.flatnonzero(bad)[0])].sha256[:12]
        raise ValueError(
            f"{record.checkpoint}: the teacher gave non-finite logits (NaN/inf) for {int(bad.sum())} of "
            f"{len(images)} images (first: {first}); nothing was written. Check the checkpoint, e.g. "
            "its BatchNorm running statistics"
        )
    prob = softmax(logits)
    pred, conf = prob.argmax(1), prob.max(1)
    out = Path(cfg.out_dir)
    hist, edges = np.histogram(conf, bins=20, range=(0.0, 1.0))
    report: dict[str, Any] = {
        "images": len(images),
        "teacher_sha256": record.sha256,
        "images_fingerprint": clean.fingerprint,
        "classes": classes,
        "device": str(device),
        "images_per_second": round(len(images) / max(seconds, 1e-9), 1),
        "per_class": {c: int((pred == k).sum()) for k, c in enumerate(classes)},
        "confidence_quantiles": {q: round(float(np.quantile(conf, q / 100)), 4) for q in (10, 50, 90)}
        if len(conf)
        else {},
        "confidence_histogram": hist.tolist(),
        "transfer": transfer_diagnostics(pred, conf, queries, classes),
    }
    if cfg.truth:
        report["demo_truth"] = _truth_metrics(WorldTruth.load(cfg.truth), clean.kept, pred, classes)
    PseudoLabels.save(out, logits, report)
    bar_chart(
        hist.tolist(), [f"{e:.2f}" for e in edges[:-1]], out / "confidence.png", "teacher confidence on the web pool"
    )
    log.info("label: %d images, %.0f images/s on %s", len(images), report["images_per_second"], device)
    print(_table(report), file=sys.stderr)
    if "demo_truth" in report:
        t = report["demo_truth"]
        line = (
            f"label: teacher accuracy on in-class web images {t['in_class_accuracy']:.3f} "
            f"({t['in_class']} images); pseudo-label accuracy on all kept images {t['all_accuracy']:.3f} "
            f"({t['all']})"
        )
        print(line, file=sys.stderr)
    regime = report["transfer"]["regime"]
    print(f"label: regime [{regime['code']}]: {regime['message']}", file=sys.stderr)
    warnings = report["transfer"]["warnings"]
    for w in warnings:
        print(f"label: warning [{w['code']}]: {w['message']}", file=sys.stderr)
    if warnings and cfg.strict:
        codes = ", ".join(w["code"] for w in warnings)
        raise TransferWarning(
            f"label.strict is on and the teacher's view of the web pool raised: {codes} "
            f"(details above and in {out / 'report.json'})"
        )
    return report


class TransferWarning(RuntimeError):
    """``label.strict``: a transfer diagnostic is treated as a failure (the outputs are still written)."""


def _table(report: dict[str, Any]) -> str:
    """Per class: images crawled for it, the teacher's share of the pool, agreement, confidence, and the
    annotator model's estimates of how often the teacher and the query are right."""
    t = report["transfer"]
    accuracy = (report.get("demo_truth") or {}).get("per_class") or {}
    rows: list[list[Any]] = [
        [
            "class",
            "crawled",
            "teacher share",
            "agrees with query",
            "confidence",
            "teacher right (est.)",
            "its calls right (est.)",
            "query right (est.)",
            *(["accuracy (demo)"] if accuracy else []),
        ]
    ]
    for c in t["per_class"]:
        cells = [
            c["class"][:30],
            c["crawled"],
            f"{c['teacher_share']:.1%}",
            "-" if c["agreement"] is None else f"{c['agreement']:.1%}",
            "-" if c["confidence"] is None else f"{c['confidence']:.2f}",
            f"{c['teacher_accuracy_est']:.0%}",
            f"{c['teacher_precision_est']:.0%}",
            f"{c['query_accuracy_est']:.0%}",
        ]
        if accuracy:
            a = accuracy.get(c["class"])
            cells.append("-" if a is None else f"{a:.1%}")
        rows.append(cells)
    a = t["annotators"]
    tail = (
        f"label: the teacher agrees with the crawl queries on {t['agreement']:.1%} of the images "
        f"(chance {t['chance_agreement']:.1%}, kappa {t['kappa']:.2f}); the annotator model (EM, "
        f"{a['iterations']} iterations) estimates the teacher right on {a['teacher_accuracy']:.1%}, the query on "
        f"{a['query_accuracy']:.1%}, junk {a['junk_share']:.1%}"
    )
    return format_table(rows) + "\n" + tail


def _truth_metrics(
    truth: WorldTruth, kept: tuple[KeptImage, ...], pred: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Demo only: compare pseudo-labels with the world's ground truth (junk can never be right)."""
    true = truth.labels([k.sha256 for k in kept], classes)
    in_class = true >= 0
    junk = int((~in_class).sum())
    per_class = {c: round(float((pred[true == k] == k).mean()), 4) for k, c in enumerate(classes) if (true == k).any()}
    return {
        "per_class": per_class,
        "all": len(kept),
        "all_accuracy": round(float((pred == true).mean()), 4) if len(kept) else 0.0,
        "in_class": int(in_class.sum()),
        "in_class_accuracy": round(float((pred[in_class] == true[in_class]).mean()), 4) if in_class.any() else 0.0,
        "junk_or_broken": junk,
    }
