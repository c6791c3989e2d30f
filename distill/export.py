"""Export the deployable student: plain weights, three runnable formats and a model card.

The deployable student is the network that makes the logits: for ``kd`` and ``dfnd`` the plain
backbone; for ``kd3`` backbone + projector + the copied teacher classifier (``KD3Student`` without
its training-only contrastive head). ``student.pt`` is that network's state dict, so it loads into
the module ``arch`` in ``student.json`` describes (``load_student`` rebuilds it); it expects
normalised input.

The runnable formats wrap it with the teacher's normalisation: they take float RGB in [0, 1],
shaped (B, C, S, S) at the teacher's input size, and return logits in the order of
``meta["classes"]``. ``student.pt2`` is a ``torch.export`` ExportedProgram, ``student.onnx`` an
ONNX graph (with the ``onnx`` extra installed), ``student.ts`` TorchScript, kept for
compatibility. Each is checked against the PyTorch student on a batch before it is recorded; a
format that fails is logged and recorded in ``student.json`` with its reason, never fatal.
``meta`` travels inside each archive (``kd3.json``) and in ``student.json``, which
``model_card.md`` renders for people.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd3util import atomic_path, sha256_file, write_json, write_text

log = logging.getLogger(__name__)
ATOL = 1e-4  # every exported format must reproduce the PyTorch student's logits this closely
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # the [onnx] extra: exporter, runtime, graph builder


class Deployable(nn.Module):
    """The exported student: normalisation baked in, the training-only head removed."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, student: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.student = copy.deepcopy(student).cpu().eval()
        if getattr(self.student, "head", None) is not None:
            self.student.head = None  # type: ignore[assignment]  # training-only contrastive head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student((x - self.mean) / self.std)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Hide torch's deprecation notice for ``torch.jit``: kd3 keeps TorchScript for compatibility."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        yield


def describe_arch(student: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What ``load_student`` needs to rebuild the deployable network before loading ``student.pt``."""
    from distill.methods.kd3 import KD3Student

    arch: dict[str, Any] = {
        "kind": "backbone",
        "backbone": meta["student"],
        "num_classes": len(meta["classes"]),
        "in_chans": int(meta["in_chans"]),
    }
    if isinstance(student, KD3Student):
        arch |= {
            "kind": "kd3",
            "teacher_channels": int(student.classifier.in_features),
            "teacher_hw": int(student.teacher_hw),
            "classifier_bias": student.classifier.bias is not None,
        }
    return arch


def build_arch(arch: dict[str, Any]) -> nn.Module:
    """The untrained deployable network ``arch`` describes (the inverse of ``describe_arch``)."""
    from distill.models import build_model

    backbone = build_model(arch["backbone"], arch["num_classes"], arch["in_chans"])
    if arch["kind"] == "backbone":
        return backbone
    if arch["kind"] == "kd3":
        from distill.methods.kd3 import KD3Student

        c_t = arch["teacher_channels"]
        classifier = nn.Linear(c_t, arch["num_classes"], bias=arch["classifier_bias"])
        return KD3Student(backbone, classifier, c_t, arch["teacher_hw"], contrastive=False)
    raise ValueError(f"unknown student arch kind {arch['kind']!r} (expected backbone or kd3)")


def _export_torchscript(model: Deployable, example: torch.Tensor, path: Path, meta_json: str) -> None:
    with atomic_path(path) as tmp, quiet_torchscript(), torch.no_grad():
        # the input size is fixed at export, so a shape test frozen by the trace is what is wanted
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(tmp), _extra_files={"kd3.json": meta_json})
        _check(torch.jit.load(str(tmp)), model, example, "TorchScript")


def _export_program(model: Deployable, example: torch.Tensor, path: Path, meta_json: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # torch's archive reader warns about CPU weights it regroups ("No complete tensor found"):
        # our weights are on the CPU, and the parity check below is the test that matters
        warnings.filterwarnings("ignore", r"No complete tensor found", UserWarning)
        torch.export.save(program, tmp, extra_files={"kd3.json": meta_json})
        _check(torch.export.load(tmp).module(), model, example, "torch.export")


def onnx_missing() -> list[str]:
    """The packages of the ``onnx`` extra that cannot be imported here."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The ONNX graph builder logs every optimisation pass at INFO: only its warnings reach the stage's log."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_onnx(model: Deployable, example: torch.Tensor, path: Path, meta_json: str) -> None:
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(path) as tmp, _quiet_loggers("onnxscript", "onnx_ir"):
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key="kd3.json", value=meta_json)
        onnx.save(proto, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        _check(lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model, example, "ONNX")


def _check(run: Callable[[torch.Tensor], torch.Tensor], model: Deployable, example: torch.Tensor, what: str) -> None:
    """The exported file reproduces the student on a batch of another size than the example's."""
    x = torch.rand(len(example) + 1, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = run(x), model(x)
    if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL, rtol=ATOL):
        err = float((got - want).abs().max()) if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise RuntimeError(f"{what} export does not reproduce the student's outputs (max difference {err})")


def _reason(e: BaseException) -> str:
    """One line for the record: the exporter's own cause when it wraps one, without terminal colours."""
    cause = e.__cause__ or e
    first = (str(cause).strip().splitlines() or [""])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {first}")[:300]


def export_student(student: nn.Module, out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``student.pt``, the runnable formats, ``student.json`` and ``model_card.md``; returns the record.

    TorchScript must succeed (evaluate runs it); ``torch.export`` and ONNX failing for an
    architecture is logged and recorded, and their stale files from an earlier run are removed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Deployable(student, meta["mean"], meta["std"]).eval()
    shape = (2, meta["in_chans"], meta["input_size"], meta["input_size"])
    example = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    meta_json = json.dumps(meta)
    weights, script = out_dir / "student.pt", out_dir / "student.ts"
    with atomic_path(weights) as tmp:
        torch.save(model.student.state_dict(), tmp)
    _export_torchscript(model, example, script, meta_json)
    formats: dict[str, dict[str, str]] = {}
    for key, title, name, export, missing in (
        ("torch_export", "torch.export", "student.pt2", _export_program, []),
        ("onnx", "ONNX", "student.onnx", _export_onnx, onnx_missing()),
    ):
        path = out_dir / name
        if missing:
            formats[key] = {"skipped": f"not installed: {', '.join(missing)} (pip install 'kd3[onnx]')"}
            log.info("%s export skipped: %s not installed (pip install 'kd3[onnx]')", title, ", ".join(missing))
        else:
            try:
                export(model, example, path, meta_json)
                formats[key] = {"file": name, "sha256": sha256_file(path)}
                continue
            except Exception as e:  # an exporter's failure for one architecture must not cost the run
                formats[key] = {"failed": _reason(e)}
                log.warning(
                    "%s export failed for %s (recorded in student.json): %s", title, meta["student"], _reason(e)
                )
        path.unlink(missing_ok=True)  # never leave an earlier run's file beside a record that disowns it
    record = {
        **meta,
        "arch": describe_arch(model.student, meta),
        "weights": weights.name,
        "torchscript": script.name,
        "weights_sha256": sha256_file(weights),
        "torchscript_sha256": sha256_file(script),
        "formats": {"torchscript": {"file": script.name, "sha256": sha256_file(script)}, **formats},
    }
    write_json(out_dir / "student.json", record)
    write_text(out_dir / "model_card.md", model_card(record))
    return record


def _read_record(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "student.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported student (run kd3 distill first)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun kd3 distill") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object; rerun kd3 distill")
    return record


def _checked(out_dir: str | Path, record: dict[str, Any], file_key: str, sha_key: str) -> Path:
    path = Path(out_dir) / record[file_key]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (named by {Path(out_dir) / 'student.json'}); rerun kd3 distill")
    if sha256_file(path) != record[sha_key]:
        raise ValueError(f"{path}: does not match {Path(out_dir) / 'student.json'} (changed since export)")
    return path


def load_exported(out_dir: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript student, after checking the archive against the record's SHA-256."""
    record = _read_record(out_dir)
    script = _checked(out_dir, record, "torchscript", "torchscript_sha256")
    with quiet_torchscript():
        model = torch.jit.load(str(script), map_location="cpu")
    return model.eval(), record


def load_student(out_dir: str | Path) -> tuple[Deployable, dict[str, Any]]:
    """The student rebuilt in plain PyTorch from ``student.pt`` (no archive code runs), normalisation included.

    Takes float RGB in [0, 1], (B, C, S, S); returns logits in the order of ``record["classes"]``.
    """
    record = _read_record(out_dir)
    where = Path(out_dir) / "student.json"
    if "arch" not in record:
        raise ValueError(f"{where}: no 'arch' (exported by an older kd3); rerun kd3 distill")
    weights = _checked(out_dir, record, "weights", "weights_sha256")
    net = build_arch(record["arch"])
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the arch in {where}: {str(e).splitlines()[0]}") from None
    return Deployable(net, record["mean"], record["std"]).eval(), record


def _fmt(value: Any) -> str:
    return "not recorded" if value is None else str(value)


def model_card(record: dict[str, Any]) -> str:
    """A short Markdown card for people: what goes in, what comes out, where it came from, how good it is."""
    arch = record["arch"]
    net = arch["backbone"] if arch["kind"] == "backbone" else f"{arch['backbone']} + projector + teacher classifier"
    classes = record["classes"]
    s, c = record["input_size"], record["in_chans"]
    lines = [
        f"# Student: {record['student']} distilled with {record['method']}",
        "",
        f"- Network: {net} (`student.pt`, a state dict; `arch` in `student.json`)",
        f"- Input: float {'RGB' if c == 3 else 'grey'} in [0, 1], shape (B, {c}, {s}, {s}), NCHW",
        f"- Normalisation (inside the runnable formats, not in `student.pt`): mean {record['mean']}, "
        f"std {record['std']}",
        f"- Output: logits for {len(classes)} classes, in this order: {', '.join(classes)}",
        f"- Teacher SHA-256: {record.get('teacher_sha256')}",
        f"- Training data: the web images in {_fmt(record.get('clean_dir'))}; training images: "
        f"{_fmt(record.get('train_images'))}, held out: {_fmt(record.get('heldout_images'))} "
        f"(holdout fraction {_fmt(record.get('holdout'))})",
        f"- Validation accuracy at export: {_fmt(record.get('val_accuracy'))}",
        "",
        "| format | file | status |",
        "|---|---|---|",
    ]
    for key, entry in record["formats"].items():
        status = "ok, sha256 " + entry["sha256"][:16] if "file" in entry else entry.get("skipped") or entry["failed"]
        lines.append(f"| {key} | {entry.get('file', '-')} | {status} |")
    return "\n".join(lines) + "\n"
