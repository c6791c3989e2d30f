"""Stage ``evaluate``: accuracy on a labelled set of the original distribution, for ``dvc metrics``.

The set is an image folder with one sub-folder per class name (``evaluate.eval_dir``; matched
ignoring case and spacing, ``/`` in a class name written ``_``: ``T-shirt_top``), or in the
demo the Fashion-MNIST test split rendered as the teacher's training data (items ``[first:last]``;
the demo keeps test[0:2000] aside as a validation split). Writes ``metrics/teacher.json``
(accuracy; per-class values go to ``teacher_details.json``) and ``metrics/predictions.csv``
(one row per evaluated image: its index, true class and predicted classes by name, which
``dvc plots`` draws as confusion matrices); with ``student_dir`` also ``metrics/student.json`` (the
exported student's accuracy, agreement with the teacher on the same set and on the web images the
distill stage held out, its size and its CPU speed). Without a labelled set (both ``eval_dir`` and
``fashion_mnist`` null) accuracy cannot be measured: the stage still scores the student's agreement
with the teacher on the held-out web images, and the predictions file has a header only.
"""

from __future__ import annotations

import csv
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data import holdout_mask, resolve_device
from distill.label import confusion, predict
from distill.teacher import Teacher
from kd3util import atomic_path, write_metrics
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.student import ExportedStudent
from pipeline.artifacts.teacher import TeacherRecord
from pipeline.config import EvaluateConfig
from pipeline.evalset import load_eval_set

log = logging.getLogger(__name__)
NO_EVAL_SET = "no labelled set (evaluate.eval_dir): accuracy not measured, only agreement with the teacher"
PREDICTIONS = "predictions.csv"


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    record = TeacherRecord.load(cfg.teacher_dir)
    teacher = record.load_teacher()
    classes = record.classes
    device = resolve_device(cfg.device)
    teacher.to(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (cfg.eval_dir or cfg.fashion_mnist):
        # no labelled images of the original distribution: agreement with the teacher is all we can measure
        metrics: dict[str, Any] = {"eval_set": None, "eval_images": 0, "teacher_sha256": record.sha256}
        write_metrics(out / "teacher.json", metrics)
        print(f"evaluate: {NO_EVAL_SET}", file=sys.stderr)
        if cfg.student_dir:
            metrics["student"], _ = _student(cfg, teacher, device, record, None, out)
        _write_predictions(out / PREDICTIONS, cfg.first, None, classes)
        return metrics
    images, labels, source, skipped = load_eval_set(
        cfg.eval_dir, cfg.fashion_mnist, cfg.first, cfg.last, classes, record.input_size
    )
    logits = predict(
        teacher,
        images,
        input_size=record.input_size,
        in_chans=record.in_chans,
        batch_size=cfg.batch_size,
        device=device,
    )
    pred = logits.argmax(1)
    cm = confusion(labels.astype(np.int64), pred, len(classes))
    per_class = {c: round(float(cm[k, k] / max(cm[k].sum(), 1)), 4) for k, c in enumerate(classes)}
    metrics = {
        "teacher_accuracy": round(float((pred == labels).mean()), 4),
        "teacher_per_class": per_class,
        "eval_set": source,
        "eval_range": [cfg.first, cfg.first + len(labels)],
        "eval_images": len(labels),
        "skipped_files": skipped,
        "teacher_sha256": record.sha256,
    }
    write_metrics(out / "teacher.json", metrics)
    print(
        f"evaluate: teacher accuracy {metrics['teacher_accuracy']:.4f} on {len(labels)} images ({source})",
        file=sys.stderr,
    )
    columns = {"actual": labels.astype(np.int64), "teacher": pred}
    if cfg.student_dir:
        metrics["student"], columns["student"] = _student(
            cfg, teacher, device, record, (images, labels, pred, source), out
        )
    _write_predictions(out / PREDICTIONS, cfg.first, columns, classes)
    return metrics


def _write_predictions(path: Path, first: int, columns: dict[str, np.ndarray] | None, classes: list[str]) -> None:
    """One row per evaluated image, classes by name (DVC's confusion template reads it directly)."""
    names = list(columns) if columns else ["actual", "teacher"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", *names])
        if columns:
            table = np.stack([columns[n] for n in names], axis=1)
            w.writerows([first + i, *(classes[k] for k in row)] for i, row in enumerate(table.tolist()))


def _speed(model: torch.nn.Module, size: int, chans: int, batch: int = 64) -> dict[str, float]:
    """CPU latency of one image (median of 20 calls) and throughput at ``batch`` images per call."""
    x1, xb = torch.rand(1, chans, size, size), torch.rand(batch, chans, size, size)
    with torch.inference_mode():
        for x in (x1, xb, x1, xb):  # warm-up: the first calls of a TorchScript module optimise it
            model(x)
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            model(x1)
            lat.append(time.perf_counter() - t0)
        t0, calls = time.perf_counter(), 0
        while calls < 5 or time.perf_counter() - t0 < 0.5:
            model(xb)
            calls += 1
        rate = calls * batch / (time.perf_counter() - t0)
    return {"cpu_latency_ms": round(statistics.median(lat) * 1e3, 3), "cpu_images_per_second": round(rate, 1)}


def _student(
    cfg: EvaluateConfig,
    teacher: Teacher,
    device: torch.device,
    record: TeacherRecord,
    labelled: tuple[np.ndarray, np.ndarray, np.ndarray, str] | None,
    out: Path,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The exported student on the labelled set (images, labels, the teacher's predictions, its name) if
    there is one, its agreement with the teacher there and on the web images distill held out, its size
    and its CPU speed. Returns the metrics and the student's predictions on the labelled set."""
    exported = ExportedStudent.load(cfg.student_dir, record)  # type: ignore[arg-type]
    model, meta = exported.load_model(), exported.meta
    classes = record.classes
    cpu = torch.device("cpu")  # the exported TorchScript student is evaluated where it will be deployed
    kw = {"input_size": meta["input_size"], "in_chans": meta["in_chans"], "batch_size": cfg.batch_size, "device": cpu}
    metrics: dict[str, Any] = {"method": meta["method"], "student": meta["student"], "eval_images": 0}
    pred = None
    if labelled is not None:
        images, labels, teacher_pred, source = labelled
        pred = predict(model, images, **kw).argmax(1)
        cm = confusion(labels.astype(np.int64), pred, len(classes))
        metrics.update(
            {
                "student_accuracy": round(float((pred == labels).mean()), 4),
                "student_per_class": {
                    c: round(float(cm[k, k] / max(cm[k].sum(), 1)), 4) for k, c in enumerate(classes)
                },
                "agreement_eval": round(float((pred == teacher_pred).mean()), 4),
                "eval_images": len(labels),
            }
        )
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["weights_bytes"] = (Path(cfg.student_dir) / "student.pt").stat().st_size  # type: ignore[arg-type]
    metrics.update(_speed(model, meta["input_size"], meta["in_chans"]))
    clean = CleanSet.load(meta["clean_dir"])
    rows = np.flatnonzero(holdout_mask(clean.keys, meta["holdout"]))
    metrics["heldout_web_images"] = len(rows)
    if len(rows):
        web = clean.images[rows]
        t_web = predict(teacher, web, **{**kw, "device": device}).argmax(1)  # the teacher loaded once, in run()
        metrics["agreement_heldout_web"] = round(float((predict(model, web, **kw).argmax(1) == t_web).mean()), 4)
    write_metrics(out / "student.json", metrics)
    on_web = f"{metrics.get('agreement_heldout_web', float('nan')):.4f} on {len(rows)} held-out web images"
    if labelled is not None:
        print(
            f"evaluate: student accuracy {metrics['student_accuracy']:.4f}, agreement with the teacher "
            f"{metrics['agreement_eval']:.4f} (eval set), {on_web}",
            file=sys.stderr,
        )
    else:
        print(f"evaluate: student agreement with the teacher {on_web}", file=sys.stderr)
    return metrics, pred
