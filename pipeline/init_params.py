"""``kd3 init``: a params file for your own teacher, class file and URL list (or engines).

Starts from a template (the demo's ``params.yaml``), switches every demo-only key off, and fills
the teacher's section from what the checkpoint itself tells: its format, the architecture whose
keys and shapes it has, and, for torchvision architectures, torchvision's usual input size and
ImageNet normalisation. Whatever is assumed or could not be inferred is listed, so the user knows
which lines to check. Not a stage: it writes a file and runs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crawl.classes import read_classes
from pipeline.config import ConfigError, read_params

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class InitReport:
    filled: list[str] = field(default_factory=list)  # read from the checkpoint or the arguments
    assumed: list[str] = field(default_factory=list)  # a usual value: check it
    unknown: list[str] = field(default_factory=list)  # could not be inferred: set it


def infer_teacher(
    checkpoint: Path, num_classes: int, arch: str | None, input_size: int | None, report: InitReport
) -> dict[str, Any]:
    """The ``teacher:`` keys a checkpoint lets us fill, with what was assumed recorded in ``report``."""
    from distill.models import MODELS, architectures_like
    from distill.teacher import TeacherSpec, load_state_dict, sniff_checkpoint

    out: dict[str, Any] = {"checkpoint": str(checkpoint)}
    kind = sniff_checkpoint(checkpoint) if checkpoint.is_file() else "missing"
    if kind == "missing":
        raise ConfigError(f"{checkpoint}: teacher checkpoint not found")
    if kind == "torchscript":
        out["format"] = "torchscript"
        report.filled.append("teacher.format: torchscript (it runs code from the archive: only for trusted files)")
        report.unknown.append("teacher.arch: a TorchScript teacher is logit-only (use distill.method: kd)")
    else:
        out["format"] = "state_dict"
        if arch is None:
            shapes = {k: tuple(v.shape) for k, v in load_state_dict(TeacherSpec(str(checkpoint), num_classes)).items()}
            exact = [name for name, diffs in architectures_like(shapes, num_classes) if not diffs]
            if exact:
                arch = exact[0]
                report.filled.append(f"teacher.arch: {arch} (its keys and shapes)")
            else:
                report.unknown.append("teacher.arch: no registry or torchvision architecture has exactly its keys")
        else:
            report.filled.append(f"teacher.arch: {arch}")
        out["arch"] = arch  # null when unknown: the teacher stage then refuses to guess
    torchvision = bool(arch) and arch not in MODELS
    if input_size is not None:
        out["input_size"] = input_size
        report.filled.append(f"teacher.input_size: {input_size}")
    elif torchvision:
        out["input_size"] = 224
        report.assumed.append("teacher.input_size: 224 (torchvision's usual size; the size it was trained at)")
    else:
        report.unknown.append("teacher.input_size: the side the teacher was trained at")
    if torchvision:
        out["mean"], out["std"] = IMAGENET_MEAN, IMAGENET_STD
        report.assumed.append("teacher.mean/std: ImageNet's (torchvision's usual normalisation)")
    else:
        report.unknown.append("teacher.mean/std: the normalisation the teacher was trained with")
    return out


def init_params(
    template: Path,
    checkpoint: Path,
    classes: Path,
    *,
    urls: Path | None = None,
    engines: list[str] | None = None,
    arch: str | None = None,
    input_size: int | None = None,
    eval_dir: Path | None = None,
    allow_private: bool = False,
) -> tuple[dict[str, Any], InitReport]:
    """The params for a real run, and what was filled, assumed and left unknown."""
    params = read_params(template)
    report = InitReport()
    names = [c.name for c in read_classes(str(classes))]
    report.filled.append(f"crawl.classes, teacher.classes: {classes} ({len(names)} classes)")
    params["teacher"] = {
        **params.get("teacher", {}),
        "classes": str(classes),
        **infer_teacher(checkpoint, len(names), arch, input_size, report),
    }
    params["teacher"].pop("demo", None)
    crawl = params.setdefault("crawl", {})
    crawl["classes"] = str(classes)
    if urls is not None:
        crawl["engines"], crawl["urls_file"] = ["urls"], str(urls)
        report.filled.append(f"crawl.engines: [urls], crawl.urls_file: {urls}")
    else:
        crawl["engines"] = engines or ["bing"]
        report.assumed.append(f"crawl.engines: {crawl['engines']}")
    # the template is tuned for the demo's own server; the defaults are polite to real ones
    crawl["http"] = {"allow_private": allow_private}
    params.setdefault("clean", {})["image_size"] = None
    params.setdefault("label", {})["truth"] = None
    distill = params.setdefault("distill", {})
    distill["truth"] = None
    distill["eval"] = {"eval_dir": None, "fashion_mnist": None, "first": 0, "last": None}
    evaluate = params.setdefault("evaluate", {})
    evaluate.update(fashion_mnist=None, eval_dir=str(eval_dir) if eval_dir else None, first=0, last=None)
    if eval_dir is None:
        report.unknown.append("evaluate.eval_dir: labelled images, one folder per class (else agreement only)")
    if params["teacher"].get("format") == "torchscript" or not params["teacher"].get("arch"):
        distill["method"] = "kd"  # logit-only until the architecture (and so its feature map) is known
    # the world section stays: without the mirror engine its stage reads no data, only writes a marker
    return params, report


def write_params(params: dict[str, Any], path: Path, report: InitReport) -> None:
    head = ["# Written by kd3 init. Every key: docs/params.md. Check the lines below before dvc repro."]
    head += [f"#   assumed: {a}" for a in report.assumed] + [f"#   set it:  {u}" for u in report.unknown]
    path.write_text(
        "\n".join(head) + "\n" + yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
