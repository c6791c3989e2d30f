"""Loss terms and selection rules: finite, gradients where they belong, known values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from distill.losses import (
    alpha_schedule,
    class_thresholds,
    feature_align,
    instance_align,
    kd_logit,
    mix_distribution,
    noise_adapt,
    query_log_prior,
    select_instances,
    transition_matrix,
)


@pytest.fixture()
def g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_kd_logit_known_value_zero_at_equality_and_gradient_to_the_student_only(g: torch.Generator) -> None:
    s = torch.randn(4, 5, generator=g, requires_grad=True)
    t = torch.randn(4, 5, generator=g, requires_grad=True)
    loss = kd_logit(s, t, 4.0)
    p_t, p_s = F.softmax(t / 4, 1), F.softmax(s / 4, 1)
    by_hand = 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert torch.isfinite(loss) and torch.allclose(loss, by_hand, atol=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert kd_logit(t.detach(), t.detach()).abs() < 1e-6


def test_feature_align_weights_and_gradients(g: torch.Generator) -> None:
    proj = torch.randn(3, 8, 4, 4, generator=g, requires_grad=True)
    ft = torch.randn(3, 8, 4, 4, generator=g, requires_grad=True)
    s_logits = torch.randn(3, 5, generator=g, requires_grad=True)
    t_logits = torch.randn(3, 5, generator=g)
    loss = feature_align(proj, ft, s_logits, t_logits)
    w = torch.sigmoid((s_logits - t_logits).norm(dim=1)).detach()
    by_hand = (w.view(-1, 1, 1, 1) * (proj - ft) ** 2).mean()
    assert torch.allclose(loss, by_hand) and 0.5 < float(w.min()) and float(w.max()) < 1
    loss.backward()
    assert proj.grad is not None and ft.grad is None and s_logits.grad is None  # weights carry no gradient
    assert feature_align(ft.detach(), ft.detach(), s_logits, t_logits) == 0


def test_instance_align_is_low_for_matching_views_and_log_2b_minus_1_for_identical_embeddings(
    g: torch.Generator,
) -> None:
    u = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    aligned = instance_align(u, u, 0.3)
    shuffled = instance_align(u, u[torch.randperm(8, generator=g)], 0.3)
    assert aligned < shuffled
    same = F.normalize(torch.ones(4, 3), dim=1)
    assert instance_align(same, same, 0.3).item() == pytest.approx(math.log(7), rel=1e-5)  # 2B-1 equal logits


def test_transition_matrix_and_noise_adaptation(g: torch.Generator) -> None:
    theta = torch.randn(4, 4, generator=g, requires_grad=True)
    q = transition_matrix(theta, 0.9)
    assert torch.allclose(q.sum(1), torch.ones(4)) and torch.allclose(q.diagonal(), torch.full((4,), 0.9))
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (6,), generator=g)
    loss = noise_adapt(logits, labels, q)
    by_hand = -torch.log((F.softmax(logits, 1) @ q)[torch.arange(6), labels]).mean()
    assert torch.isfinite(loss) and torch.allclose(loss, by_hand)
    loss.backward()
    assert theta.grad is not None and logits.grad is not None  # both Q's θ and the student learn


def test_mix_distribution_mixes_statistics_and_is_seeded() -> None:
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 7).view(6, 1, 1, 1)
    a = mix_distribution(x, torch.Generator().manual_seed(5))
    b = mix_distribution(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, x)  # statistics moved towards the partners'
    # per image and channel only mean and scale change: the centred content is perfectly correlated
    ca = (a - a.mean((2, 3), keepdim=True)).reshape(18, -1)
    cx = (x - x.mean((2, 3), keepdim=True)).reshape(18, -1)
    assert float(F.cosine_similarity(ca, cx).min()) > 0.9999


def released_time_d(epoch: int, max_epoch: int = 120) -> float:
    """The released code's schedule (``helper/util.py: time_d``), with its 1-based epoch counter."""
    return 1 - math.exp(-5 * (((epoch + 1) / 160) - 1) ** 2) if epoch < max_epoch else 0.0


@pytest.mark.parametrize(("t", "value"), [(1, 0.992), (20, 0.977), (60, 0.853), (100, 0.493), (119, 0.268), (120, 0.0)])
def test_alpha_schedule_matches_the_released_values_one_based(t: int, value: float) -> None:
    # the released training loop runs ``for epoch in range(1, epochs + 1)``: our 0-based epoch t - 1
    assert released_time_d(t) == pytest.approx(value, abs=1e-3)
    assert alpha_schedule(t - 1, 240) == pytest.approx(value, abs=1e-3)
    assert alpha_schedule(t - 1, 240, released=True) == pytest.approx(value, abs=1e-3)


def test_alpha_schedule_first_epoch_is_the_released_first_epoch() -> None:
    assert alpha_schedule(0, 240) == pytest.approx(released_time_d(1))  # not time_d(0): no epoch behind
    assert alpha_schedule(118, 240) > 0 and alpha_schedule(119, 240) == 0.0  # t = 119 is the last with α > 0


def test_alpha_schedule_scales_with_the_number_of_epochs_unless_released() -> None:
    assert alpha_schedule(29, 60) == 0.0 and alpha_schedule(28, 60) > 0
    assert alpha_schedule(4, 60) == pytest.approx(alpha_schedule(19, 240), abs=0.01)
    # the released constants on a 15-epoch run: the teacher decides throughout
    assert min(alpha_schedule(e, 15, released=True) for e in range(15)) > 0.97


def test_class_thresholds_and_selection() -> None:
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    th = class_thresholds(pred, 4)
    assert th[0] == pytest.approx(0.95) and th[1] == pytest.approx(0.95 * 0.5 / 1.5) and th[3] == 0
    t = torch.tensor([[9.0, 0, 0], [0.2, 0.1, 0], [0, 9.0, 0]])
    s = torch.zeros(3, 3)
    mask, pseudo = select_instances(t, s, alpha=1.0)
    assert pseudo.tolist() == [0, 0, 1] and mask.tolist() == [True, False, True]
    mask, _ = select_instances(t, s, alpha=0.0)  # the untrained student alone is never confident
    assert mask.tolist() == [False, False, False]


def test_query_prior_is_a_distribution_and_uniform_when_unknown() -> None:
    lp = query_log_prior(torch.tensor([2, -1, 0]), 4, 0.7)
    assert torch.allclose(lp.exp().sum(1), torch.ones(3))
    assert torch.isclose(lp[0, 2].exp(), torch.tensor(0.7)) and torch.isclose(lp[0, 0].exp(), torch.tensor(0.1))
    assert torch.allclose(lp[1].exp(), torch.full((4,), 0.25))


def test_kd_with_a_prior_targets_the_tempered_posterior() -> None:
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(5, 4, generator=g)
    lp = query_log_prior(torch.tensor([0, 1, 2, 3, -1]), 4, 0.7)
    matched = t_logits + 4.0 * lp  # softmax(o/T) = softmax(o_T/T) · π (renormalised)
    assert kd_logit(matched, t_logits, 4.0, lp) < 1e-5
    assert kd_logit(t_logits, t_logits, 4.0, lp) > 0.01 and kd_logit(t_logits, t_logits, 4.0) < 1e-6


def test_kd_weighs_each_image_and_unit_weights_are_plain_kd() -> None:
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.isclose(kd_logit(s_logits, t_logits, 4.0, weight=torch.ones(6)), kd_logit(s_logits, t_logits, 4.0))
    first = torch.tensor([1.0, 0, 0, 0, 0, 0])  # the mean is still over the whole batch
    assert torch.isclose(kd_logit(s_logits, t_logits, 4.0, weight=first) * 6, kd_logit(s_logits[:1], t_logits[:1], 4.0))


def test_selection_scales_each_confidence_by_its_weight() -> None:
    t = torch.tensor([[9.0, 0, 0], [0, 9.0, 0]])
    mask, pseudo = select_instances(t, torch.zeros(2, 3), alpha=1.0, tau=0.9, weight=torch.tensor([1.0, 0.5]))
    assert mask.tolist() == [True, False] and pseudo.tolist() == [0, 1]  # the half-junk row falls under τ
