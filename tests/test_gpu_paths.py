"""The trainer's GPU-minded code paths, exercised on the CPU: no host syncs in a step, the deferred
non-finite guard, generator hygiene, the pool upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill.data import ImagePool
from distill.losses import mix_distribution
from distill.methods.kd3 import KD3Method, KD3Options
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.teacher import Teacher
from distill.trainer import NonFiniteLoss, Trainer

from conftest import poison_loss_at_call


def test_mix_distribution_seeds_no_global_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded mix must not reseed the CUDA generators (``torch.manual_seed`` does, and nothing
    restores them): every step would reset the state dropout and other CUDA draws read."""
    seeded: list[int] = []
    real = torch.cuda.manual_seed_all

    def spy(seed: int) -> Any:
        seeded.append(seed)
        return real(seed)

    monkeypatch.setattr(torch.cuda, "manual_seed_all", spy)
    x = torch.randn(8, 3, 16, 16)
    before = torch.get_rng_state()
    a = mix_distribution(x, torch.Generator().manual_seed(3))
    b = mix_distribution(x, torch.Generator().manual_seed(3))
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_a_read_only_memmap_uploads_without_a_warning(tmp_path: Path) -> None:
    """pyproject makes warnings errors: a read-only memmap handed to torch as it is warns."""
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    pool = ImagePool(mm, torch.device("cpu"), resident=True)  # the CUDA upload path, onto the CPU
    assert pool.resident and pool.data is not None and torch.equal(pool.data, torch.from_numpy(images))
    frozen = images.copy()
    frozen.flags.writeable = False
    pool = ImagePool(frozen, torch.device("cpu"))
    assert pool.data is not None and torch.equal(pool.data, torch.from_numpy(images))


class HostReads(TorchDispatchMode):
    """Counts what makes a host wait for a GPU: a tensor read back as a Python number or list."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), int(), float()
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def kd3_trainer(tmp_path: Path | None = None, **rt: Any) -> Trainer:
    images = np.random.default_rng(0).integers(0, 256, (96, 36, 36, 3), dtype=np.uint8)
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", 3), [0.5] * 3, [0.25] * 3)
    options = KD3Options(selection=False, kd_weight=0.5, query_prior=0.5, mix_weight=0.5)  # 6 steps an epoch
    method = KD3Method(teacher, build_model("resnet8", 3), options, input_size=32)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images[:, 2:34, 2:34]).permute(0, 3, 1, 2).float() / 255)
    return Trainer(
        method,
        ImagePool(images, torch.device("cpu")),
        logits,
        schedule=Schedule(epochs=2, batch_size=16, lr=0.05),
        augment=Augment(size=32),
        runtime=Runtime(**rt),
        seed=0,
        queries=np.arange(96) % 3,
        checkpoint=None if tmp_path is None else tmp_path / "ckpt.pt",
        fingerprint="gpu-paths",
    )


def test_a_training_step_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each read-back stalls the queue: a step (forward, guard, backward, update) has none."""
    t = kd3_trainer()
    t.select()
    tolist: list[int] = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (tolist.append(1), real_tolist(self))[1])
    _, idx, u8 = next(t._batches())
    with HostReads() as mode:
        terms, verdict = t.train_step(idx, u8)
    assert mode.reads == [] and tolist == []
    assert {"loss", "feature_align", "instance_align", "kd"} <= terms.keys() and verdict.ndim == 0


@pytest.mark.parametrize("policy", ["abort", "skip"])
def test_deferred_guard_skips_on_the_device_and_reports_the_step(tmp_path: Path, policy: str) -> None:
    """As on a GPU (verdicts read every 100 steps): a NaN loss at step 2 leaves the weights finite;
    abort names that step before the epoch's checkpoint, skip counts it."""
    t = kd3_trainer(tmp_path, nan_policy=policy)
    t.sync_every = 100
    calls = poison_loss_at_call(t, 2)
    if policy == "abort":
        with pytest.raises(NonFiniteLoss, match="non-finite loss at epoch 1 step 2"):
            t._run_epoch()
        assert not (tmp_path / "ckpt.pt").exists()
    else:
        row = t.fit()[0]
        assert row["skipped_steps"] == 1 and np.isfinite(row["loss"])
        assert t.global_step == sum(max(1, r["selected"] // 16) for r in t.history) - 1
    assert calls["n"] >= 3  # the steps after the bad one ran before the host looked
    assert all(torch.isfinite(v).all() for v in t.method.state_dict().values() if v.is_floating_point())


def test_a_skipped_first_step_leaves_zero_momentum() -> None:
    """The fused SGD allocates its momentum buffers uninitialised on the first step and writes
    them only if the step is taken: a skipped first step must not leave garbage for the next."""
    t = kd3_trainer()
    t.select()
    forward = t.method.forward
    t.step_fn = lambda *a: {**(out := forward(*a)), "loss": out["loss"] * float("nan")}  # type: ignore[assignment]
    batches = t._batches()
    _, idx, u8 = next(batches)
    fill = [torch.full_like(p, 7.0) for p in t.params]  # leave non-zero memory behind for empty_like to reuse
    del fill
    _, verdict = t.train_step(idx, u8)
    assert int(verdict) == 2
    buffers = [t.opt.state[p]["momentum_buffer"] for p in t.params]
    assert all(torch.count_nonzero(b) == 0 for b in buffers)


def test_the_pool_budget_follows_the_device() -> None:
    from distill.data import pool_budget_bytes

    assert pool_budget_bytes(None, torch.device("cpu")) == 0  # the CPU never copies the pool
    assert pool_budget_bytes(4096, torch.device("cpu")) == 0
    gpu = torch.device("cuda", 0)
    assert pool_budget_bytes(None, gpu, free_bytes=80 << 30) == 40 << 30  # half of what is free
    assert pool_budget_bytes(1024, gpu, free_bytes=80 << 30) == 1024 << 20  # a set budget wins
