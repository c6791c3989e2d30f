"""Training throughput: our trainer against a straightforward reference loop, same models, loss and batch.

The reference is how KD³ is usually written: a ``Dataset`` that turns each packed row into a PIL
image and applies ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in
``DataLoader`` workers, fp32, contiguous (NCHW) tensors, and each epoch's selection pass run as the
authors' code runs it (teacher and student over the augmented pool). Ours is ``distill.trainer``:
uint8 pool on the device, batched crop/flip, bf16 + channels-last on CUDA, selection on the clean
view with the label stage's cached teacher logits.

Two rows per pair: the training steps alone (identical work: the same KD³ loss, three forward
passes per step), and whole epochs including the selection pass. Needs no data (random images
and weights) and nothing beyond the package's own dependencies.

    python benchmarks/train_speed.py                     # CPU: the demo pair, about a minute on 2 cores
    python benchmarks/train_speed.py --device cuda --pairs cifar imagenet   # GPU (benchmarks/gpu_check.sh)
    python benchmarks/train_speed.py --dry               # toy sizes: checks that it runs

The table goes to ``benchmarks/results/train_speed.md`` (on CUDA ``train_speed-cuda.md``; with
``--dry`` under ``benchmarks/out/``; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import default_out, report  # noqa: E402

from distill.data import ImagePool, resolve_device  # noqa: E402
from distill.methods.kd3 import KD3Method, KD3Options  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.settings import Augment, Runtime, Schedule  # noqa: E402
from distill.teacher import Teacher  # noqa: E402
from distill.trainer import Trainer  # noqa: E402

PAIRS = {  # name: (teacher, student, input side, stored side)
    "demo": ("resnet8", "resnet8", 32, 48),
    "cifar": ("resnet34", "resnet18", 32, 40),
    "imagenet": ("torchvision/resnet50", "torchvision/resnet18", 224, 256),
}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class PoolDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, images: np.ndarray, size: int) -> None:
        from torchvision import transforms

        self.images = images
        self.tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=(0.35, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tf(Image.fromarray(self.images[i])), i


def build(pair: str, device: torch.device, n: int, seed: int = 0) -> tuple[KD3Method, np.ndarray]:
    t_arch, s_arch, size, stored = PAIRS[pair]
    torch.manual_seed(seed)
    teacher = Teacher(build_model(t_arch, 10), MEAN, STD)
    method = KD3Method(teacher, build_model(s_arch, 10), KD3Options(selection=True), input_size=size)
    images = np.random.default_rng(seed).integers(0, 256, (n, stored, stored, 3), dtype=np.uint8)
    return method.to(device), images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference(pair: str, device: torch.device, n: int, batch: int, steps: int, workers: int) -> dict[str, float]:
    """The straightforward loop: PIL transforms in workers, fp32, NCHW; selection on augmented views."""
    method, images = build(pair, device, n)
    size = PAIRS[pair][2]
    ds = PoolDataset(images, size)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    t = method.teacher

    def step_loop(limit: int) -> tuple[int, float]:
        method.train()
        seen, t0 = 0, 0.0
        for i, (x, _) in enumerate(loader):
            if i == 1:
                sync(device)
                t0, seen = time.perf_counter(), 0  # the first batch pays for worker start-up
            if i > limit:
                break
            x = x.to(device, non_blocking=True)
            x01 = x * t.std + t.mean  # the method's forward takes [0, 1] input
            terms = method(x01, None)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            seen += len(x)
        sync(device)
        return seen, time.perf_counter() - t0

    step_loop(2)  # warm-up
    seen, secs = step_loop(steps)
    # selection as the released code runs it: S and T over the augmented pool, every epoch
    method.eval()
    sel_loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers, persistent_workers=False)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in sel_loader:
            x = x.to(device)
            t(x * t.std + t.mean)
            method.student(x)
    sync(device)
    sel = time.perf_counter() - t0
    step_rate = seen / secs
    return {"steps": step_rate, "epoch": n / (n / step_rate + sel)}


def cycle_batches(trainer: Trainer, k: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``k`` training batches from the whole pool, reshuffled as often as ``k`` needs: a timing loop
    must not depend on how many rows a selection kept (random weights may keep one batch)."""
    n, b = len(trainer.rows), trainer.schedule.batch_size
    gen = torch.Generator().manual_seed(0)
    laps = -(-k * b // n)
    trainer.order, trainer.step = torch.cat([torch.randperm(n, generator=gen) for _ in range(laps)])[: k * b], 0
    return trainer._batches()


def ours(pair: str, device: torch.device, n: int, batch: int, steps: int, compile_: bool = False) -> dict[str, float]:
    method, images = build(pair, device, n)
    size = PAIRS[pair][2]
    with torch.no_grad():
        logits = torch.zeros(n, 10)
    trainer = Trainer(
        method,
        ImagePool(images, device),
        logits,
        schedule=Schedule(epochs=1, batch_size=batch, lr=0.01),
        augment=Augment(size=size),
        runtime=Runtime(device=device, compile=compile_),
        seed=0,
    )
    trainer.select()
    it = cycle_batches(trainer, steps + 3)
    method.train()

    def run(k: int) -> tuple[int, float]:
        sync(device)
        t0, seen = time.perf_counter(), 0
        for _ in range(k):
            _, idx, u8 = next(it)
            trainer.train_step(idx, u8)  # the trainer's own step: augmentation, AMP, NaN guard, optimiser
            seen += len(idx)
        sync(device)
        return seen, time.perf_counter() - t0

    run(3)  # warm-up (and compilation)
    seen, secs = run(steps)
    sync(device)
    t0 = time.perf_counter()
    trainer.select()  # clean view, student only: the teacher's logits come from the label stage
    sync(device)
    sel = time.perf_counter() - t0
    step_rate = seen / secs
    return {"steps": step_rate, "epoch": n / (n / step_rate + sel)}


# operator families, by substring of the profiler's operator name (first match wins)
FAMILIES = (
    ("convolution", "convolutions"),
    ("batch_norm", "batch norm"),
    ("sgd", "optimiser"),
    ("_foreach", "optimiser"),
)


def busy_fraction(pair: str, device: torch.device, n: int, batch: int, steps: int) -> tuple[float, dict[str, float]]:
    """Kernel time / wall time over ``steps`` training steps of our trainer (torch.profiler): on CUDA
    the share of step time the GPU is busy; on a CPU (``--busy``, ``--dry``) the share spent inside
    torch operators, which runs the same code path without a GPU. Also each operator family's share
    of the wall time (``FAMILIES``, the rest as "other operators"), self time only, so nothing
    counts twice."""
    from torch.profiler import ProfilerActivity, profile

    method, images = build(pair, device, n)
    trainer = Trainer(
        method,
        ImagePool(images, device),
        torch.zeros(n, 10),
        schedule=Schedule(epochs=1, batch_size=batch, lr=0.01),
        augment=Augment(size=PAIRS[pair][2]),
        runtime=Runtime(device=device),
        seed=0,
    )
    trainer.select()
    it = cycle_batches(trainer, steps + 3)
    method.train()

    def one() -> None:
        _, idx, u8 = next(it)
        trainer.train_step(idx, u8)

    for _ in range(3):
        one()
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        sync(device)
        wall = time.perf_counter() - t0
    shares: dict[str, float] = {label: 0.0 for _, label in FAMILIES} | {"other operators": 0.0}
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        label = next((lab for key, lab in FAMILIES if key in e.key.lower()), "other operators")
        shares[label] += us / 1e6 / wall
    return sum(shares.values()), shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", nargs="+", default=["demo"], choices=list(PAIRS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pool", type=int, default=4096, help="pool images (selection pass)")
    ap.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--busy", action="store_true", help="share of step time spent in kernels (default on CUDA)")
    ap.add_argument("--dry", action="store_true", help="tiny sizes, --busy on: check that everything runs (no figures)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/train_speed.md")
    args = ap.parse_args()
    device = resolve_device(args.device)
    out = args.out or default_out(__file__, keep=not args.dry, device=device.type)
    if args.dry:
        args.steps, args.pool, args.batch = 2, 256, 32
    args.busy = args.busy or args.dry or device.type == "cuda"
    t_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"KD³ training throughput, images/s ({t_name}; batch {args.batch}, {args.steps} timed steps, "
        f"pool {args.pool}, reference with {args.workers} DataLoader workers"
        + ("; --dry: toy sizes, not a measurement)" if args.dry else ")"),
        "",
        "| pair | trainer | reference steps | ours steps | ratio | reference epoch | ours epoch | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)  # each row follows as soon as it is measured
    notes: list[str] = []
    for pair in args.pairs:
        batch = args.batch if pair != "imagenet" else min(args.batch, 64)
        ref = reference(pair, device, args.pool, batch, args.steps, args.workers)
        variants = [("ours", ours(pair, device, args.pool, batch, args.steps))]
        if args.compile:
            variants.append(("ours + torch.compile", ours(pair, device, args.pool, batch, args.steps, True)))
        for name, res in variants:
            line = (
                f"| {pair} | {name} | {ref['steps']:.0f} | {res['steps']:.0f} | {res['steps'] / ref['steps']:.2f}x "
                f"| {ref['epoch']:.0f} | {res['epoch']:.0f} | {res['epoch'] / ref['epoch']:.2f}x |"
            )
            lines.append(line)
            print(line, flush=True)
        if args.busy:
            busy, shares = busy_fraction(pair, device, args.pool, batch, args.steps)
            what = "GPU busy" if device.type == "cuda" else "inside torch operators"
            parts = ", ".join(f"{label} {100 * share:.0f}%" for label, share in shares.items())
            notes.append(f"{pair}: {what} {100 * busy:.0f}% of step time (ours): {parts}.")
            conv = shares["convolutions"]
            if conv > 0:  # the steps ratio if everything but the convolutions took no time at all
                best = variants[0][1]["steps"] / conv / ref["steps"]
                notes[-1] += f" Convolutions alone would allow at most {best:.2f}x the reference's steps."
            print(notes[-1], flush=True)
    if notes:
        lines += ["", *notes]
    report(out, "Training speed: kd3's trainer against a reference loop", "\n".join(lines), f"{device} ({t_name})")


if __name__ == "__main__":
    main()
