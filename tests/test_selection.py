"""KD³'s per-epoch instance selection, end to end through the trainer on a tiny real pool.

Every check recomputes the selection in float64 NumPy from the scores (the cached teacher logits,
the student's logits recomputed here on the same view) with the method's α schedule, thresholds
and query prior, and compares it with what the trainer kept, trained on and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from demo.fashion_mnist import fashion_mnist_rgb32
from distill.data import ImagePool, random_resized_crop, uint8_to_float
from distill.methods.kd3 import KD3Method, KD3Options
from distill.models import build_model
from distill.settings import Augment, Runtime, Schedule
from distill.teacher import Teacher
from distill.trainer import Trainer

from conftest import synthetic_items

K = 3
MEAN, STD = [0.3] * 3, [0.35] * 3
FIRST_RELEASED_ALPHA = 1 - math.exp(-5 * (2 / 160 - 1) ** 2)  # 0.992: the teacher decides


class RecordingKD3(KD3Method):
    """KD³ that also keeps the logits each selection pass hands it; the selection itself is KD³'s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scored: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def select(
        self,
        epoch: int,
        epochs: int,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.scored.append((teacher_logits.clone(), None if student_logits is None else student_logits.clone()))
        return super().select(epoch, epochs, teacher_logits, student_logits, queries)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    items, _ = synthetic_items(8, K)
    return fashion_mnist_rgb32(items)  # (24, 32, 32, 3) uint8


def build(
    images: np.ndarray,
    options: KD3Options,
    cached: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    sharpen: float = 1.0,
    train_rows: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    epoch_size: str = "selected",
) -> Trainer:
    """A KD³ trainer over ``images`` whose label-stage teacher logits are ``cached``; ``sharpen``
    scales the teacher's classifier (shared by the student), so the untrained student is confident
    about some images."""
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", K), MEAN, STD)
    with torch.no_grad():
        teacher.classifier.weight.mul_(sharpen)
    method = RecordingKD3(teacher, build_model("resnet8", K), options, input_size=32)
    return Trainer(
        method,
        ImagePool(images, torch.device("cpu")),
        cached,
        schedule=Schedule(epochs=epochs, batch_size=batch_size, lr=0.05, epoch_size=epoch_size),  # type: ignore[arg-type]
        augment=Augment(size=32),
        runtime=Runtime(),
        seed=0,
        train_rows=train_rows,
        queries=queries,
        on_epoch=on_epoch,
    )


def student_scores(t: Trainer, x01: torch.Tensor) -> np.ndarray:
    """The student's logits for [0, 1] images, as a selection pass computes them (eval mode)."""
    student = t.method.student
    student.eval()
    x = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)  # the teacher's statistics
    with torch.no_grad():
        return student(x).double().numpy()


def scored(t: Trainer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(teacher logits, student logits) of each selection pass so far."""
    assert isinstance(t.method, RecordingKD3)
    return t.method.scored


def clean_view(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


# --------------------------------------------------------------------------------------------
# the selection rule, from the method's equations
# --------------------------------------------------------------------------------------------


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_alpha(epoch: int, epochs: int) -> float:
    """The scaled schedule: e = epoch + 1, ``1 − exp(−5((e+1)/(2E/3) − 1)²)`` while ``e < E/2``."""
    e = epoch + 1
    return 1 - math.exp(-5 * ((e + 1) / (2 * epochs / 3) - 1) ** 2) if e < epochs / 2 else 0.0


def ref_prior(queries: np.ndarray, rho: float) -> np.ndarray:
    """π(query) = ρ, (1 − ρ)/(K − 1) for the other classes; uniform where the query is unknown (−1)."""
    pi = np.full((len(queries), K), (1 - rho) / (K - 1))
    known = queries >= 0
    pi[known, queries[known]] = rho
    pi[~known] = 1 / K
    return pi


def ref_select(
    t: np.ndarray, s: np.ndarray, alpha: float, tau: float, adaptive: bool, pi: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask, ŷ, c, τ_ŷ): ``q ∝ softmax(α o_T + (1−α) o_S) · π``, ``c = max q``, keep ``c > τ_ŷ``
    with ``τ_k = τ β_k / (2 − β_k)``, ``β_k = N_k / max N`` (or ``τ`` for every class)."""
    q = softmax(alpha * t + (1 - alpha) * s)
    if pi is not None:
        q = q * pi / (q * pi).sum(axis=1, keepdims=True)
    conf, pred = q.max(axis=1), q.argmax(axis=1)
    thresholds = np.full(K, tau)
    if adaptive:
        beta = np.bincount(pred, minlength=K) / np.bincount(pred, minlength=K).max()
        thresholds = tau * beta / (2 - beta)
    return conf > thresholds[pred], pred, conf, thresholds[pred]


def crafted_logits(n: int, seed: int = 0) -> torch.Tensor:
    """Label-stage teacher logits with a spread of classes and confidences (a random teacher's own
    logits are nearly flat and all of one class)."""
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 3.0, (n, K)).astype(np.float32))


# --------------------------------------------------------------------------------------------
# per-epoch thresholds, mask and report
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("adaptive", "rho"), [(True, 0.0), (True, 0.7), (False, 0.0)])
def test_each_epoch_keeps_exactly_the_images_over_their_class_threshold(
    images: np.ndarray, adaptive: bool, rho: float
) -> None:
    n, epochs, b, tau = len(images), 6, 4, 0.6
    train = np.ones(n, dtype=bool)
    train[::6] = False  # held-out rows: never scored, never trained on
    queries = np.resize(np.array([0, 1, 2, -1]), n)  # by pool row
    cached = crafted_logits(n)
    after_epoch: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, np.ndarray]] = []

    def on_epoch(row: dict[str, Any]) -> None:
        assert t.last_selection is not None
        # the student as the next epoch's selection pass will find it
        after_epoch.append((row, *t.last_selection, student_scores(t, clean_view(images[train]))))

    options = KD3Options(tau=tau, adaptive_thresholds=adaptive, query_prior=rho)
    t = build(images, options, cached, epochs=epochs, batch_size=b, sharpen=20, train_rows=train, queries=queries)
    t.on_epoch = on_epoch
    scores = student_scores(t, clean_view(images[train]))
    t.fit()

    teacher = cached.double().numpy()[train]
    pi = ref_prior(queries[train], rho) if rho else None
    n_train, binding = int(train.sum()), 0
    assert len(after_epoch) == len(scored(t)) == epochs  # one selection pass per epoch
    for e, (row, trained, pred, next_scores) in enumerate(after_epoch):
        scored_t, scored_s = scored(t)[e]
        assert torch.equal(scored_t, cached[train])  # clean view: the label stage's logits, train rows only
        assert scored_s is not None and np.allclose(scored_s.double().numpy(), scores, rtol=1e-4, atol=1e-4)
        mask, ref_pred, conf, thr = ref_select(teacher, scores, ref_alpha(e, epochs), tau, adaptive, pi)
        assert np.abs(conf - thr).min() > 1e-5  # no image sits on its threshold: float32 cannot flip one
        assert pred.tolist() == ref_pred.tolist(), e
        if mask.sum() >= b:
            assert trained.tolist() == mask.tolist(), e  # exactly the images over their threshold
            binding += bool(mask.sum() < n_train)
        else:
            assert int(trained.sum()) == b, e  # the guard: one batch
        assert row["selected"] == int(trained.sum())
        assert row["selected_fraction"] == round(float(trained.float().mean()), 4)
        scores = next_scores
    assert binding >= 3  # the thresholds dropped images in most epochs, as α handed over to the student


# --------------------------------------------------------------------------------------------
# the guard: top-B when fewer than a batch pass
# --------------------------------------------------------------------------------------------


def guard_logits(n: int, n_rare: int) -> torch.Tensor:
    """``n − n_rare`` rows the teacher calls class 0 fairly confidently (0.86 to 0.93, under that
    class's threshold 0.95), each a little surer than the last so their ranking is unambiguous,
    then ``n_rare`` rows of class 1 at 0.58, over class 1's lower threshold (0.53 or less while
    β = n_rare/(n − n_rare) <= 10/14)."""
    common = torch.zeros(n - n_rare, K)
    common[:, 0] = 2.5 + 0.05 * torch.arange(n - n_rare)
    rare = torch.tensor([[0.0, 1.0, 0.0]]).repeat(n_rare, 1)
    return torch.cat([common, rare])


@pytest.mark.parametrize(("n_rare", "guard"), [(7, True), (8, False), (10, False)])
def test_the_guard_takes_one_batch_when_fewer_pass_and_only_then(images: np.ndarray, n_rare: int, guard: bool) -> None:
    n, b = len(images), 8
    cached = guard_logits(n, n_rare)
    # released α: the teacher decides (α ≈ 0.99), so its ranking is also the combined one
    t = build(images, KD3Options(alpha_schedule="released"), cached, batch_size=b)
    row = t.fit()[0]
    assert t.last_selection is not None
    trained, pred = t.last_selection
    rare = np.arange(n) >= n - n_rare
    assert pred.tolist() == rare.astype(int).tolist()
    if guard:  # 7 rare images passed: the 8 most confident images instead, all of class 0
        top = np.zeros(n, dtype=bool)
        top[n - n_rare - b : n - n_rare] = True
        assert trained.tolist() == top.tolist()
    else:  # a batch or more passed: exactly those, although class 0 holds more confident images
        assert trained.tolist() == rare.tolist()
    assert row["selected"] == (b if guard else n_rare)
    assert row["selected_fraction"] == round(float(trained.float().mean()), 4)


def test_the_guard_ranks_by_the_confidence_the_selection_uses(images: np.ndarray) -> None:
    n, b = len(images), 8
    cached = torch.zeros(n, K)
    cached[:, 0] = torch.linspace(0.0, 9.0, n)  # the teacher is surest about the last rows
    # 2 epochs, scaled: α = 0 from the first epoch, the student decides; fixed τ = 0.95: nobody passes
    t = build(images, KD3Options(adaptive_thresholds=False), cached, epochs=2, batch_size=b)
    conf = softmax(student_scores(t, clean_view(images))).max(axis=1)
    t.select()
    assert t.last_selection is not None
    expected = np.zeros(n, dtype=bool)
    expected[np.argsort(-conf)[:b]] = True
    assert t.last_selection[0].tolist() == expected.tolist()


# --------------------------------------------------------------------------------------------
# what the selection scores: cached teacher logits (clean) or fresh augmented views
# --------------------------------------------------------------------------------------------


def test_clean_view_scores_the_cached_teacher_logits_without_drawing(images: np.ndarray) -> None:
    n = len(images)
    cached = guard_logits(n, 10)
    t = build(images, KD3Options(alpha_schedule="released"), cached)
    state = t.aug_gen.get_state()
    t.select()
    assert t.last_selection is not None
    first = [x.clone() for x in t.last_selection]
    t.select()
    assert t.last_selection is not None
    assert all(torch.equal(a, c) for a, c in zip(first, t.last_selection, strict=True))  # same view, same choice
    assert torch.equal(t.aug_gen.get_state(), state)  # no crop was drawn
    scored_t, scored_s = scored(t)[0]
    assert torch.equal(scored_t, cached)
    own = student_scores(t, clean_view(images))
    assert scored_s is not None and np.allclose(scored_s.double().numpy(), own, rtol=1e-4, atol=1e-4)
    mask, _, _, _ = ref_select(cached.double().numpy(), own, FIRST_RELEASED_ALPHA, 0.95, True)
    assert first[0].tolist() == mask.tolist() and mask.sum() == 10
    with torch.no_grad():  # the teacher itself would have chosen otherwise: the cache is what was read
        real = t.method.teacher(clean_view(images)).double().numpy()
    assert ref_select(real, own, FIRST_RELEASED_ALPHA, 0.95, True)[0].tolist() != mask.tolist()


def augmented_views(t: Trainer, images: np.ndarray, state: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The first ``count`` augmented views of the pool the trainer's crop generator draws from ``state``
    (one eval batch holds the whole pool here)."""
    g = torch.Generator().set_state(state)
    x, a = uint8_to_float(torch.from_numpy(images)), t.augment
    return [random_resized_crop(x, a.size, a.crop_scale, g, a.flip, a.crop_ratio) for _ in range(count)]


def test_augmented_view_scores_fresh_crops_with_the_teacher(images: np.ndarray) -> None:
    n = len(images)
    cached = guard_logits(n, 10)
    t = build(images, KD3Options(selection_view="augmented"), cached, sharpen=20)  # logits that tell views apart
    state = t.aug_gen.get_state()
    t.select()
    t.select()
    (t1, s1), (t2, s2) = scored(t)
    assert s1 is not None and s2 is not None
    assert not torch.allclose(t1, cached) and not torch.allclose(t1, t2)  # fresh teacher logits each epoch
    view = augmented_views(t, images, state, 1)[0]
    with torch.no_grad():
        assert torch.allclose(t1, t.method.teacher(view), rtol=1e-4, atol=1e-4)  # the teacher on the first crops drawn
    clean = torch.from_numpy(student_scores(t, clean_view(images))).float()
    assert not torch.allclose(s1, clean, atol=1e-2) and not torch.allclose(s1, s2, atol=1e-2)  # and the student


def test_augmented_view_scores_teacher_and_student_on_the_same_crops(images: np.ndarray) -> None:
    t = build(images, KD3Options(selection_view="augmented"), guard_logits(len(images), 10), sharpen=20)
    state = t.aug_gen.get_state()
    t.select()
    scored_t, scored_s = scored(t)[0]
    view = augmented_views(t, images, state, 1)[0]
    with torch.no_grad():
        assert torch.allclose(scored_t, t.method.teacher(view), rtol=1e-4, atol=1e-4)
    own = torch.from_numpy(student_scores(t, view)).float()
    assert scored_s is not None and torch.allclose(scored_s, own, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# selection off
# --------------------------------------------------------------------------------------------


def test_without_selection_every_epoch_keeps_every_image(images: np.ndarray) -> None:
    n = len(images)
    cached = guard_logits(n, 10)  # what selection would have cut to 10 images
    t = build(images, KD3Options(selection=False), cached, epochs=2)
    history = t.fit()
    assert [r["selected"] for r in history] == [n, n]
    assert [r["selected_fraction"] for r in history] == [1.0, 1.0]
    assert t.last_selection is not None and bool(t.last_selection[0].all())
    assert [s is None for _, s in scored(t)] == [True, True]  # not even a student pass


@pytest.mark.parametrize("epoch_size", ["selected", "pool"])
def test_epoch_size_pool_fills_the_pool_s_steps_from_the_kept_images(images: np.ndarray, epoch_size: str) -> None:
    n = len(images)
    t = build(images, KD3Options(alpha_schedule="teacher"), guard_logits(n, 10), epoch_size=epoch_size)
    t.select()
    assert t.order is not None and t.last_selection is not None
    kept = set(torch.nonzero(t.last_selection[0]).flatten().tolist())
    assert len(kept) == 10 and set(t.order.tolist()) == kept  # only kept images, every one of them
    counts = np.bincount(t.order.numpy(), minlength=n)[sorted(kept)]
    if epoch_size == "selected":
        assert len(t.order) == 10 and counts.max() == 1
    else:  # as many as the pool, each kept image drawn ceil(n/10) or one time fewer
        assert len(t.order) == n and counts.max() - counts.min() <= 1 and counts.max() == -(-n // 10)


def test_alpha_teacher_lets_the_teacher_decide_every_epoch(images: np.ndarray) -> None:
    t = build(images, KD3Options(alpha_schedule="teacher"), guard_logits(len(images), 10), epochs=4)
    assert [t.method.alpha(e, 4) for e in range(4)] == [1.0] * 4  # type: ignore[attr-defined]
