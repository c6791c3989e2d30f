"""Loading the user's teacher safely, and the frozen ``Teacher`` every later stage uses.

``load_teacher(spec)`` accepts:

- ``format: state_dict`` — a ``torch.save``d state dict (or the wrappers ``{"state_dict": ...}``,
  ``{"model": ...}``, keys prefixed ``module.``), or a ``.safetensors`` file (parsed by the
  safetensors library from bytes read into memory, never memory-mapped), plus ``arch`` from
  ``distill.models``: a registry name, or a torchvision name, whose checkpoints load with
  torchvision's own keys (``torchvision.models.resnet18(num_classes=10).state_dict()`` with
  ``arch: torchvision/resnet18``). Pickles are only ever read with ``torch.load(weights_only=True)``
  passed explicitly (an environment variable can flip the default), first in a child process with
  an address-space limit, so a checkpoint that would allocate without bound kills the child, not us.
- ``format: torchscript`` — only when named: a TorchScript archive runs code from the archive,
  so it must come from a trusted source. Auto-detection never picks it: a TorchScript or
  ``torch.export`` archive given as a state dict is refused before anything is loaded.

Every failure is a ``TeacherError`` naming the file: missing, empty, a folder, over the size cap,
truncated/corrupt, unsafe (non-allowlisted globals), wrong architecture (the first mismatching
keys, and the registry or torchvision architecture whose keys the checkpoint does have, when
one does), wrong number of outputs, non-finite weights, and finite weights that still give
non-finite outputs (a negative BatchNorm ``running_var``, say) on a small seeded probe batch.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from crawl.isolate import IsolatedPool
from distill.models import (
    MODELS,
    Backbone,
    FeatureAccessError,
    TorchvisionModel,
    architectures_like,
    build_model,
    set_feature_access,
    strip_net_prefix,
)
from distill.settings import TeacherSpec


class TeacherError(ValueError):
    """The teacher cannot be used; the message names the checkpoint and what is wrong."""


# --------------------------------------------------------------------------------------------
# what kind of file is it?
# --------------------------------------------------------------------------------------------


def sniff_checkpoint(path: Path) -> str:
    """``torch_zip``, ``torchscript``, ``torch_export``, ``legacy_pickle``, ``safetensors`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "torch_zip"  # a damaged zip: let the loader say it is truncated
        if any(n.endswith("/code/") or "/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
            return "torch_export"
        return "torch_zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "legacy_pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# what the safetensors library's messages mean for a user, by a phrase each contains
_SAFETENSORS_HINTS = (
    ("recursion limit", "its JSON header is nested too deeply"),
    ("expected usize", "a negative or non-integer shape or offset"),
    ("unknown variant", "an unknown dtype"),
    ("overflow", "a tensor shape too large to address"),
    ("invalid offset", "a tensor points outside the data or overlaps another"),
    ("not fully covered", "a tensor points outside the file, or the file is truncated or has trailing bytes"),
    ("header too large", "its header is over the 100 MB limit"),
    ("invalid JSON", "its JSON header is malformed"),
)


def read_safetensors(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    """Read a .safetensors file with the safetensors library, into plain CPU tensors (copies, not mmap).

    The library validates the header (size, JSON depth, dtypes, shapes, offsets that tile the data
    exactly); around it we cap the bytes read, name the file in every error and accept only dtypes
    a classifier's weights come in.
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # the file may have grown since its size was checked
    if len(data) > max_bytes:
        raise TeacherError(f"{path}: over the cap of {max_bytes} bytes (teacher.max_bytes)")
    if len(data) < 8:
        raise TeacherError(f"{path}: corrupt safetensors header (the file is {len(data)} bytes, truncated)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TeacherError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {len(data)}-byte file)")
    try:
        views = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        detail = str(e).removeprefix("Error while deserializing: ")
        what = "header" if "header" in detail else "file"
        hint = next((f": {h}" for phrase, h in _SAFETENSORS_HINTS if phrase in detail), "")
        raise TeacherError(f"{path}: corrupt safetensors {what}{hint} ({detail[:200]})") from None
    del data
    out = {}
    for key, view in views:
        dtype = SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            raise TeacherError(
                f"{path}: safetensors entry {key!r} has dtype {view['dtype']}, which a teacher cannot use "
                f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        raw = view["data"]  # a bytearray of its own: the tensor owns its memory
        out[key] = (
            torch.frombuffer(raw, dtype=dtype).reshape(view["shape"])
            if raw
            else torch.empty(view["shape"], dtype=dtype)
        )
    return out


# --------------------------------------------------------------------------------------------
# loading a state dict
# --------------------------------------------------------------------------------------------


def _torch_load(path: str) -> Any:
    # explicit weights_only=True: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only applies when it is not passed
    return torch.load(path, map_location="cpu", weights_only=True)


def _probe(path: str) -> int:
    """Run in the memory-limited child: the same load, reporting only how many tensors it holds."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    obj = _torch_load(path)
    return len(obj) if isinstance(obj, dict) else -1


def _explain(path: Path, message: str) -> TeacherError:
    low = message.lower()
    first = message.strip().splitlines()[0][:200] if message.strip() else ""
    if "weights only load failed" in low or "unsupported global" in low:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message))) or ["unknown"]
        return TeacherError(
            f"{path}: unsafe checkpoint (non-allowlisted globals: {', '.join(names)}); it was not "
            "unpickled. Save model.state_dict() instead of whole objects."
        )
    if "memory" in low or "alloc" in low:
        return TeacherError(f"{path}: loading needs more memory than teacher.memory_limit_mb allows ({first})")
    if "central directory" in low or "zip archive" in low or "pytorchstreamreader" in low or "eof" in low:
        return TeacherError(f"{path}: checkpoint corrupt or truncated ({first})")
    return TeacherError(f"{path}: cannot load checkpoint ({first})")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a state dict or the common wrappers; strip ``module.`` prefixes (DataParallel/DDP)."""
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise TeacherError(f"{path}: not a state dict (found {type(obj).__name__}); save model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TeacherError(f"{path}: the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_state_dict(spec: TeacherSpec) -> dict[str, torch.Tensor]:
    """Read the checkpoint's tensors: size, format, safe unpickling, wrappers and finite values checked."""
    path = Path(spec.checkpoint)
    if not path.exists():
        raise TeacherError(f"{path}: teacher checkpoint not found")
    if path.is_dir():
        raise TeacherError(f"{path}: is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise TeacherError(f"{path}: checkpoint file is empty")
    if size > spec.max_bytes:
        raise TeacherError(f"{path}: {size} bytes, over the cap of {spec.max_bytes} (teacher.max_bytes)")
    kind = sniff_checkpoint(path)
    if kind in ("torchscript", "torch_export"):
        raise TeacherError(
            f"{path}: unsupported format: this is a {kind.replace('_', ' ')} archive; it was not loaded. "
            "Set teacher.format: torchscript only if it comes from a trusted source (it runs code)."
        )
    if kind == "safetensors":
        tensors = read_safetensors(path, spec.max_bytes)
    elif kind in ("torch_zip", "legacy_pickle"):
        with IsolatedPool(_probe, 1, spec.load_timeout_s, spec.memory_limit_mb << 20) as pool:
            ((_, status, value),) = list(pool.imap_unordered([(0, (str(path),))]))
        if status != "ok":
            if status == "crash":
                raise TeacherError(
                    f"{path}: loading needs more memory than teacher.memory_limit_mb allows "
                    f"(the loader process died: {value})"
                )
            if status == "timeout":
                raise TeacherError(f"{path}: loading took longer than {spec.load_timeout_s:g} s")
            raise _explain(path, str(value))
        try:
            obj = _torch_load(str(path))
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise _explain(path, str(e)) from None
        tensors = _unwrap(obj, path)
    else:
        raise TeacherError(f"{path}: not a PyTorch checkpoint, safetensors or TorchScript file (unrecognised bytes)")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TeacherError(f"{path}: non-finite weights (NaN or inf) in {key!r}; refusing to label with it")
    return tensors


# --------------------------------------------------------------------------------------------
# the teacher
# --------------------------------------------------------------------------------------------


class Teacher(nn.Module):
    """A frozen teacher: always in eval mode, no gradients, with its own input normalisation.

    ``forward(x)`` takes float images in [0, 1], (B, C, H, W), and returns logits; ``features(x)``
    the last-stage feature map (KD³), when the architecture exposes one.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:  # the teacher never leaves eval mode
        return super().train(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.model, Backbone):
            raise FeatureAccessError("a TorchScript teacher exposes logits only; logit-only methods (kd) still work")
        return self.model.forward_features(self.normalise(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last-stage map and the logits from one pass."""
        f = self.features(x)
        return f, self.model.forward_head(f)  # type: ignore[operator]

    def feature_shape(self, input_size: int, in_chans: int = 3) -> tuple[int, int]:
        """(channels, side) of the last-stage map for a square input."""
        with torch.no_grad():
            f = self.features(torch.zeros(1, in_chans, input_size, input_size, device=self.mean.device))
        return int(f.shape[1]), int(f.shape[-1])

    @property
    def classifier(self) -> nn.Linear:
        if not isinstance(self.model, Backbone):
            raise FeatureAccessError("a TorchScript teacher exposes logits only; logit-only methods (kd) still work")
        return self.model.classifier


def _canonical(arch: str) -> str:
    return arch if arch in MODELS else "torchvision/" + arch.removeprefix("torchvision/")


def _layout_hint(tensors: dict[str, torch.Tensor], arch: str, num_classes: int, in_chans: int) -> str:
    """Which known architecture the checkpoint's keys belong to, for the mismatch message."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        candidates = architectures_like(shapes, num_classes, in_chans)
    except Exception:  # a hint must never replace the real error
        return ""
    others = [(name, diffs) for name, diffs in candidates if _canonical(name) != _canonical(arch)]
    if not others:
        return "" if candidates else "; no registry or torchvision architecture has exactly these keys"
    name, diffs = others[0]
    if not diffs:
        return f"; its keys and shapes are those of {name!r}: set teacher.arch: {name}"
    return f"; its keys are those of {name!r}, but {len(diffs)} shapes differ (first: {'; '.join(diffs[:2])})"


def _mismatches(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, spec: TeacherSpec) -> None:
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked (checkpoints from before it existed)
    missing = [k for k in own if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in own]
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
        arch = spec.arch or ""
        hint = _layout_hint(tensors, arch, spec.num_classes, spec.in_chans)
        raise TeacherError(f"{path}: does not match architecture {arch!r}: " + "; ".join(parts) + hint)


def probe_batch(in_chans: int, size: int) -> torch.Tensor:
    """Four fixed images in [0, 1] to run a new teacher on: black, white and two of seeded noise."""
    noise = torch.rand(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    flat = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, in_chans, size, size)
    return torch.cat([flat, noise])


def _check_outputs(teacher: Teacher, spec: TeacherSpec, path: Path, input_size: int) -> None:
    """Run the probe batch: the output must have one logit per class and be finite everywhere."""
    try:
        with torch.no_grad():
            out = teacher(probe_batch(spec.in_chans, input_size))
    except (RuntimeError, AssertionError, ValueError, torch.jit.Error) as e:  # e.g. a ViT built for 224 x 224
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = (lines[-1] if isinstance(e, torch.jit.Error) else lines[0])[:200]  # TorchScript's cause comes last
        raise TeacherError(f"{path}: the teacher fails on {input_size}x{input_size} inputs ({first})") from None
    if out.ndim != 2 or out.shape[1] != spec.num_classes:
        raise TeacherError(
            f"{path}: the teacher has {out.shape[-1]} outputs but the class list has {spec.num_classes} classes"
        )
    if not bool(torch.isfinite(out).all()):
        negative = [
            k
            for k, v in teacher.model.state_dict().items()
            if k.endswith("running_var") and v.is_floating_point() and bool((v < 0).any())
        ]
        where = f" (negative running_var in {', '.join(negative[:3])})" if negative else ""
        raise TeacherError(
            f"{path}: produces non-finite outputs (NaN/inf) on a probe batch although its weights are finite; "
            f"check BatchNorm running statistics{where}: running_var must be positive, and a model that "
            "diverged in training saves finite but unusable statistics"
        )


def load_teacher(spec: TeacherSpec, mean: list[float], std: list[float], input_size: int = 32) -> Teacher:
    """Build the frozen ``Teacher`` from ``spec``, or raise ``TeacherError``."""
    path = Path(spec.checkpoint)
    if spec.format == "torchscript":
        if not path.is_file():
            raise TeacherError(f"{path}: teacher checkpoint not found")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; users still ship it
                warnings.simplefilter("ignore", FutureWarning)
                model: nn.Module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise TeacherError(f"{path}: cannot load TorchScript archive ({str(e).splitlines()[0][:200]})") from None
    elif spec.format == "state_dict":
        if not spec.arch:
            raise TeacherError(f"{path}: teacher.arch is required for format state_dict")
        tensors = load_state_dict(spec)
        model = build_model(spec.arch, spec.num_classes, spec.in_chans)
        if isinstance(model, TorchvisionModel):  # saved by an older kd3, which prefixed torchvision's keys
            tensors = strip_net_prefix(tensors)
        classifier = next((k for k, m in model.named_modules() if m is model.classifier), None)
        weight = tensors.get(f"{classifier}.weight") if classifier else None
        if weight is not None and weight.ndim == 2 and weight.shape[0] != spec.num_classes:
            raise TeacherError(
                f"{path}: the teacher has {weight.shape[0]} outputs but the class list has {spec.num_classes} classes"
            )
        _mismatches(model, tensors, path, spec)
        model.load_state_dict(tensors, strict=True)
        if spec.feature_layer or spec.classifier_layer:
            if not (spec.feature_layer and spec.classifier_layer):
                raise TeacherError("teacher.feature_layer and teacher.classifier_layer go together: set both")
            set_feature_access(model, spec.feature_layer, spec.classifier_layer, input_size)
    else:
        raise TeacherError(f"teacher.format: {spec.format!r} is not one of state_dict, torchscript")
    teacher = Teacher(model, mean, std)
    _check_outputs(teacher, spec, path, input_size)
    return teacher
