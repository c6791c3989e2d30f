"""Settings of the distill code: the teacher checkpoint, the optimiser schedule, training views and
runtime (no torch needed).

Each field is declared once, with its default and range (``knob``); ``pipeline.config`` copies them
into the ``distill`` section of params with ``same_as``, so a default is never written twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kd3util import knob


@dataclass(frozen=True)
class Schedule:
    """The optimiser's schedule (SGD); each field is the ``distill`` key of the same name."""

    epochs: int = knob(30, 1, 100000)
    batch_size: int = knob(128, 2, 65536)
    lr: float = knob(0.05, 0, 10, lo_open=True)
    momentum: float = knob(0.9, 0, 1)
    weight_decay: float = knob(5e-4, 0, 1)
    nesterov: bool = False
    lr_schedule: Literal["step", "cosine"] = "step"  # step: ×gamma at each milestone; cosine
    milestones: tuple[float, ...] = knob((0.625, 0.75, 0.875), 0, 1)  # fractions of epochs (150/180/210 of 240)
    gamma: float = knob(0.1, 0, 1, lo_open=True)
    warmup_epochs: int = knob(0, 0)
    # "selected": an epoch is one pass over the images the selection kept (the paper: fewer kept, fewer
    # steps); "pool": as many steps as the whole pool, drawn from the kept images (repeated as needed),
    # so a selection changes which images are seen, not how many
    epoch_size: Literal["selected", "pool"] = "selected"
    # an exponential moving average of the student's weights, evaluated and shipped in its place
    # (0: off). Its horizon is about 1/(1 − decay) steps; it warms up as min(decay, (1+n)/(10+n))
    ema_decay: float = knob(0.0, 0, 0.9999)

    def lr_factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.gamma ** sum(epoch >= round(m * self.epochs) for m in self.milestones)


@dataclass(frozen=True)
class Augment:
    """The training views; each field but ``size`` is the ``distill`` key of the same name."""

    size: int  # the teacher's input side
    crop_scale: tuple[float, float] = knob((0.35, 1.0), 0, 1, lo_open=True)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = knob((3 / 4, 4 / 3), 0.1, 10)  # ... and aspect ratio
    flip: bool = True
    grayscale: float = knob(0.0, 0, 1)  # probability of replacing an image by its luma (colour invariance)


@dataclass(frozen=True)
class Runtime:
    """How training runs; results do not depend on these (except through numerics)."""

    device: str = "cpu"  # a torch device name ("cuda:1") or torch.device
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # NHWC model and batches (faster convolutions on CUDA and CPU)
    compile: bool = False  # torch.compile the method's forward (benchmarks/train_speed.py measures it)
    nan_policy: Literal["abort", "skip"] = "abort"
    max_skipped: int = knob(10, 1)  # consecutive non-finite steps before even "skip" aborts
    eval_batch_size: int = knob(512, 1)


@dataclass(frozen=True)
class TeacherSpec:
    """How to load a teacher checkpoint; the shared fields are ``teacher`` keys of the same name."""

    checkpoint: str
    num_classes: int
    format: Literal["state_dict", "torchscript"] = "state_dict"  # state_dict: .pt/.pth/.safetensors; torchscript
    # runs code from the archive
    arch: str | None = None  # registry or torchvision name (state_dict only)
    in_chans: int = knob(3, 1, 4)
    feature_layer: str | None = None  # module name of the last feature map, when the arch's default does not apply
    classifier_layer: str | None = None  # module name of the final nn.Linear (goes with feature_layer)
    max_bytes: int = knob(2_000_000_000, 1)  # checkpoint size cap, checked before reading
    memory_limit_mb: int = knob(8192, 64)  # address space of the child process that first unpickles the file
    load_timeout_s: float = knob(300.0, 1)
