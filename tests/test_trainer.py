"""The distillation trainer: augmentation, methods, resume, signals, NaN guard, checkpoint faults."""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from demo.fashion_mnist import fashion_mnist_rgb32
from distill.data import ImagePool, holdout_mask, random_resized_crop
from distill.methods.dfnd import DFNDMethod, DFNDOptions
from distill.methods.kd import KDMethod
from distill.methods.kd3 import KD3Method, KD3Options
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.teacher import Teacher
from distill.trainer import Method, NonFiniteLoss, Trainer, TrainingInterrupted, WeightEMA

from conftest import poison_loss_at_call, synthetic_items

MEAN, STD = [0.3] * 3, [0.35] * 3


@pytest.fixture(scope="module")
def pool_and_teacher() -> tuple[np.ndarray, Teacher]:
    images, _ = synthetic_items(24, 3)
    torch.manual_seed(0)
    return fashion_mnist_rgb32(images), Teacher(build_model("resnet8", 3), MEAN, STD)


def teacher_logits(teacher: Teacher, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def make_trainer(
    pool_and_teacher: Any,
    method_name: str = "kd3",
    epochs: int = 3,
    checkpoint: Path | None = None,
    seed: int = 0,
    ema_decay: float = 0.0,
    **rt: Any,
) -> Trainer:
    images, teacher = pool_and_teacher
    torch.manual_seed(seed)
    student = build_model("resnet8", 3)
    method: Method
    if method_name == "kd3":
        method = KD3Method(teacher, student, input_size=32)
    elif method_name == "kd":
        method = KDMethod(teacher, student)
    else:
        method = DFNDMethod(teacher, student, DFNDOptions(keep=0.5), num_classes=3)
    return Trainer(
        method,
        ImagePool(images, torch.device("cpu")),
        teacher_logits(teacher, images),
        schedule=Schedule(epochs=epochs, batch_size=16, lr=0.05, ema_decay=ema_decay),
        augment=Augment(size=32),
        runtime=Runtime(**rt),
        seed=seed,
        checkpoint=checkpoint,
        fingerprint="test",
    )


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.method.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ augmentation


def test_full_crop_without_flip_is_a_plain_resize() -> None:
    x = torch.rand(3, 3, 48, 48)
    y = random_resized_crop(x, 32, (1.0, 1.0), torch.Generator().manual_seed(0), flip=False, ratio=(1.0, 1.0))
    ref = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(y, ref, atol=1e-5)


def test_crops_are_seeded_in_range_and_flip_mirrors() -> None:
    x = torch.rand(64, 3, 40, 40)
    a = random_resized_crop(x, 32, (0.3, 1.0), torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 32, (0.3, 1.0), torch.Generator().manual_seed(1))
    assert a.shape == (64, 3, 32, 32) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    g = torch.Generator().manual_seed(2)
    unflipped = random_resized_crop(x, 32, (1.0, 1.0), g, flip=False, ratio=(1.0, 1.0))
    flips = [
        torch.allclose(
            random_resized_crop(x[i : i + 1], 32, (1.0, 1.0), torch.Generator().manual_seed(i), ratio=(1.0, 1.0)),
            unflipped[i : i + 1].flip(-1),
            atol=1e-5,
        )
        for i in range(16)
    ]
    assert 2 <= sum(flips) <= 14  # about half the images are mirrored


def test_streaming_pool_yields_the_same_batches_as_the_resident_one(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    resident = ImagePool(images, torch.device("cpu"))
    streaming = ImagePool(mm, torch.device("cpu"))
    streaming.data = None  # force the memmap + prefetch-thread path the GPU uses for large pools
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    for (i, ia, a), (j, ib, b) in zip(resident.iterate(order, 16), streaming.iterate(order, 16), strict=True):
        assert i == j and torch.equal(ia, ib)
        assert torch.equal(a, torch.from_numpy(images[ia.numpy()]))
        assert sorted(map(bytes, b.numpy())) == sorted(map(bytes, a.numpy()))  # same rows, read in sorted order


def test_holdout_is_decided_by_content_hash() -> None:
    keys = [f"{i:064x}" for i in range(0, 2**32, 2**24)]  # leading 8 hex digits spread over [0, 2^32)
    keys = [k[-8:] + k[:-8] for k in keys]
    mask = holdout_mask(keys, 0.25)
    assert mask.sum() == 64 and holdout_mask(keys, 0.25).tolist() == mask.tolist()


# ------------------------------------------------------------------------------------ methods


def test_kd3_trains_with_named_terms_and_selects_per_epoch(pool_and_teacher: Any) -> None:
    t = make_trainer(pool_and_teacher, "kd3", epochs=2)
    before = weights(t)
    history = t.fit()
    assert [r["epoch"] for r in history] == [1, 2]
    for r in history:
        assert {"loss", "feature_align", "instance_align", "selected", "images_per_second"} <= r.keys()
        assert np.isfinite(r["loss"]) and 16 <= r["selected"] <= 72
    after = t.method.state_dict()
    assert not torch.equal(before["student.backbone.conv1.weight"], after["student.backbone.conv1.weight"])
    assert torch.equal(before["student.classifier.weight"], after["student.classifier.weight"])  # shared, frozen
    assert same(
        {k: v for k, v in before.items() if k.startswith("teacher.")},
        {k: v for k, v in after.items() if k.startswith("teacher.")},
    )


def test_dfnd_keeps_the_most_confident_fraction_and_learns_q(pool_and_teacher: Any) -> None:
    t = make_trainer(pool_and_teacher, "dfnd", epochs=1)
    mask, _ = t.method.select(0, 1, t.teacher_logits, None)
    conf = torch.softmax(t.teacher_logits, 1).max(1).values
    assert mask.sum() == 36 and conf[mask].min() >= conf[~mask].max()
    theta0 = t.method.theta.detach().clone()
    row = t.fit()[0]
    assert {"kd", "noise_adapt"} <= row.keys() and row["selected"] == 36
    assert not torch.equal(theta0, t.method.theta.detach())  # Adam on θ


def test_kd_trains_on_every_image(pool_and_teacher: Any) -> None:
    row = make_trainer(pool_and_teacher, "kd", epochs=1).fit()[0]
    assert row["selected"] == 72 and row["kd"] > 0


# ------------------------------------------------------------------------------------ resume and faults


def test_resume_at_an_epoch_boundary_is_bitwise_identical(pool_and_teacher: Any, tmp_path: Path) -> None:
    full = make_trainer(pool_and_teacher, epochs=3)
    full.fit()
    ckpt = tmp_path / "ckpt.pt"
    first = make_trainer(pool_and_teacher, epochs=3, checkpoint=ckpt)
    first._run_epoch()  # one epoch, checkpoint written; then the process "dies"
    del first
    resumed = make_trainer(pool_and_teacher, epochs=3, checkpoint=ckpt)
    assert resumed.resumed and resumed.epoch == 1
    resumed.fit()
    assert same(weights(full), weights(resumed))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_checkpoints_at_the_step_boundary_then_resumes(
    pool_and_teacher: Any, tmp_path: Path, signum: int
) -> None:
    full = make_trainer(pool_and_teacher, "kd", epochs=2)  # kd: every image, 4 steps per epoch
    full.fit()
    ckpt = tmp_path / "ckpt.pt"
    t = make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=ckpt)
    calls = {"n": 0}
    forward = t.method.forward

    def forward_then_signal(*a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2
            os.kill(os.getpid(), signum)
        return forward(*a)

    t.step_fn = forward_then_signal  # type: ignore[assignment]
    with pytest.raises(TrainingInterrupted) as info:
        t.fit()
    assert info.value.signum == signum
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 6)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=ckpt)
    assert (resumed.epoch, resumed.step) == (1, 2)
    resumed.fit()
    assert resumed.global_step == full.global_step
    assert same(weights(full), weights(resumed))


def test_a_failed_checkpoint_write_keeps_the_previous_one(
    pool_and_teacher: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt.pt"
    t = make_trainer(pool_and_teacher, epochs=2, checkpoint=ckpt)
    t._run_epoch()
    good = ckpt.read_bytes()
    real_save = torch.save

    def half_then_enospc(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        real_save(obj, f, *a, **k)
        f.truncate(len(good) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        t._run_epoch()
    monkeypatch.undo()
    assert ckpt.read_bytes() == good and not list(tmp_path.glob("*.tmp"))
    resumed = make_trainer(pool_and_teacher, epochs=2, checkpoint=ckpt)
    assert resumed.resumed and resumed.epoch == 1


def test_a_foreign_checkpoint_or_other_settings_start_over(pool_and_teacher: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"PK\x03\x04 torn zip")
    assert not make_trainer(pool_and_teacher, epochs=1, checkpoint=ckpt).resumed
    t = make_trainer(pool_and_teacher, epochs=1, checkpoint=ckpt)
    t.fit()
    other = make_trainer(pool_and_teacher, epochs=1, checkpoint=ckpt)
    other.fingerprint = "other"
    assert other._resume() is False


def test_a_checkpoint_from_another_device_starts_over_cleanly(
    pool_and_teacher: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt.pt"
    make_trainer(pool_and_teacher, epochs=2, checkpoint=ckpt)._run_epoch()
    state = torch.load(ckpt, weights_only=True)
    initial = weights(make_trainer(pool_and_teacher, epochs=2))
    state["device"] = "cuda"  # as a run on a GPU writes it (same settings, same data, same fingerprint)
    torch.save(state, ckpt)
    with caplog.at_level(logging.INFO, logger="distill.trainer"):
        t = make_trainer(pool_and_teacher, epochs=2, checkpoint=ckpt)
    assert not t.resumed and t.epoch == 0 and same(weights(t), initial)
    assert "was written on cuda and this run is on cpu; starting over" in caplog.text
    state["device"] = "cpu"
    state["rng"]["ranks"][0]["aug"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    torch.save(state, ckpt)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distill.trainer"):
        t = make_trainer(pool_and_teacher, epochs=2, checkpoint=ckpt)
    assert not t.resumed and (t.epoch, t.step, t.global_step, t.history) == (0, 0, 0, [])
    assert same(weights(t), initial)  # nothing half-restored
    assert "cannot be restored here" in caplog.text and "starting over" in caplog.text
    assert [r["epoch"] for r in t.fit()] == [1, 2]


@pytest.mark.parametrize("policy", ["abort", "skip"])
def test_non_finite_loss_is_caught_before_the_step(pool_and_teacher: Any, tmp_path: Path, policy: str) -> None:
    ckpt = tmp_path / "ckpt.pt"
    t = make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=ckpt, nan_policy=policy)
    t._run_epoch()
    poison_loss_at_call(t, 2)
    if policy == "abort":
        with pytest.raises(NonFiniteLoss, match="epoch 2 step 2"):
            t._run_epoch()
        state = torch.load(ckpt, weights_only=True)
        assert state["epoch"] == 1
    else:
        t._run_epoch()
        assert t.history[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in t.method.state_dict().values() if v.is_floating_point())


def test_query_prior_pulls_selection_towards_the_crawled_class(pool_and_teacher: Any) -> None:
    images, teacher = pool_and_teacher
    t_logits, s_logits = teacher_logits(teacher, images), torch.zeros(len(images), 3)
    queries = torch.arange(len(images)) % 3
    plain = KD3Method(teacher, build_model("resnet8", 3), input_size=32)
    prior = KD3Method(teacher, build_model("resnet8", 3), KD3Options(query_prior=0.9), input_size=32)
    _, pred0 = plain.select(0, 10, t_logits, s_logits, queries)
    _, pred1 = prior.select(0, 10, t_logits, s_logits, queries)
    assert (pred1 == queries).float().mean() > (pred0 == queries).float().mean()
    assert torch.equal(plain.select(0, 10, t_logits, s_logits, queries)[1], plain.select(0, 10, t_logits, s_logits)[1])


# ------------------------------------------------------------------------------------ weight average


def test_weight_ema_follows_the_closed_form_and_copies_integer_buffers() -> None:
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(live, decay=0.9)
    ref = {k: v.detach().double().clone() for k, v in live.state_dict().items() if v.dtype.is_floating_point}
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        with torch.no_grad():
            for v in live.state_dict().values():
                if v.dtype.is_floating_point:
                    v.copy_(torch.from_numpy(rng.normal(size=tuple(v.shape))))
            live[1].num_batches_tracked += 3
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # warm-up, then the decay
        for k, v in live.state_dict().items():
            if k in ref:
                ref[k] = d * ref[k] + (1 - d) * v.double()
    got = ema.module.state_dict()
    assert all(torch.allclose(got[k].double(), ref[k], atol=1e-6) for k in ref)
    assert int(got["1.num_batches_tracked"]) == 3 * 39  # copied, not averaged
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_with_ema_the_average_is_evaluated_and_resumes_exactly(pool_and_teacher: Any, tmp_path: Path) -> None:
    seen: list[nn.Module] = []
    full = make_trainer(pool_and_teacher, "kd", epochs=2, ema_decay=0.9)
    full.evaluate = lambda m: seen.append(m) or {}  # type: ignore[func-returns-value]
    full.fit()
    assert full.ema is not None and all(m is full.ema.module for m in seen)  # evaluated: the average
    assert full.student is full.ema.module
    live, avg = full.method.student.state_dict(), full.ema.module.state_dict()
    assert any(not torch.equal(live[k], avg[k]) for k in live if live[k].dtype.is_floating_point)
    ckpt = tmp_path / "ckpt.pt"
    first = make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=ckpt, ema_decay=0.9)
    first._run_epoch()
    resumed = make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=ckpt, ema_decay=0.9)
    assert resumed.resumed and resumed.ema is not None and resumed.ema.updates == first.ema.updates  # type: ignore[union-attr]
    resumed.fit()
    assert same(full.ema.module.state_dict(), resumed.ema.module.state_dict())
    # a checkpoint from a run without the average cannot resume one with it: start over, said so
    plain = tmp_path / "plain.pt"
    make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=plain)._run_epoch()
    assert not make_trainer(pool_and_teacher, "kd", epochs=2, checkpoint=plain, ema_decay=0.9).resumed
