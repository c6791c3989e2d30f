"""Golden values for KD³'s loss: every term, the weighted sum and the α schedule, recomputed in
float64 NumPy straight from the method's equations and compared with the torch code.

The references below never call ``distill``: they are written from the formulas (weighted feature
alignment, NT-Xent, Hinton KD with the crawl-query prior, MixDistribution, the α ramp), so a change
in the torch code that moves a value shows up here even when the torch tests of the pieces agree
with each other. Inputs are small seeded tensors; every test runs well under a second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from distill.losses import (
    alpha_schedule,
    feature_align,
    instance_align,
    kd_logit,
    mix_distribution,
    query_log_prior,
)
from distill.methods.kd3 import KD3Loss, KD3Method, KD3Options
from distill.models import build_model
from distill.teacher import Teacher

RTOL = 1e-5  # torch computes in float32, the references in float64
B, K, C, D = 6, 4, 5, 8  # batch, classes, teacher channels, embedding width
QUERIES = np.array([0, 3, -1, 1, -1, 2])  # -1: several classes' queries found the image

# --------------------------------------------------------------------------------------------
# float64 references, from the equations
# --------------------------------------------------------------------------------------------


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def block_mean(m: np.ndarray, side: int) -> np.ndarray:
    """Adaptive average pooling of a (B, C, H, H) map to (B, C, side, side) when side divides H."""
    b, c, h, _ = m.shape
    f = h // side
    return m.reshape(b, c, side, f, side, f).mean(axis=(3, 5))


def ref_feature_align(
    projected: np.ndarray, teacher_map: np.ndarray, s: np.ndarray | None = None, t: np.ndarray | None = None
) -> float:
    """``mean over all elements of w_i (P(F_S)_i − F̃_T,i)²``, ``w_i = sigmoid(‖o_S,i − o_T,i‖₂)``
    (``w = 1`` without logits); a larger teacher map is first pooled to the student's size."""
    if teacher_map.shape[-1] > projected.shape[-1]:
        teacher_map = block_mean(teacher_map, projected.shape[-1])
    w = np.ones(len(projected)) if s is None or t is None else 1 / (1 + np.exp(-np.linalg.norm(s - t, axis=1)))
    return float(np.mean(w[:, None, None, None] * (projected - teacher_map) ** 2))


def ref_nt_xent(u: np.ndarray, v: np.ndarray, temperature: float) -> float:
    """SimCLR's NT-Xent: anchor i of the 2B embeddings, positive its other view, the remaining
    2B − 2 negatives; ``−log(exp(s_ip/t) / Σ_{j≠i} exp(s_ij/t))`` averaged over the 2B anchors."""
    z = np.concatenate([u, v])
    n, b = len(z), len(u)
    sim = z @ z.T / temperature
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        losses.append(-sim[i, (i + b) % n] + np.log(np.exp(sim[i, others]).sum()))
    return float(np.mean(losses))


def ref_prior(queries: np.ndarray, k: int, rho: float) -> np.ndarray:
    """π with ``π(q) = ρ`` and ``(1 − ρ)/(K − 1)`` elsewhere; uniform where the query is unknown."""
    pi = np.full((len(queries), k), (1 - rho) / (k - 1))
    for i, q in enumerate(queries):
        if q < 0:
            pi[i] = 1 / k
        else:
            pi[i, q] = rho
    return pi


def ref_kd(s: np.ndarray, t: np.ndarray, temperature: float, pi: np.ndarray | None = None) -> float:
    """``T² · KL(p_T ‖ p_S)`` averaged over the batch, ``p_T ∝ softmax(o_T/T) · π``."""
    p_t = softmax(t / temperature)
    if pi is not None:
        p_t = p_t * pi
        p_t /= p_t.sum(axis=1, keepdims=True)
    p_s = softmax(s / temperature)
    return float(temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))


def ref_terms(inp: dict[str, np.ndarray], o: KD3Options, rho: float = 0.0) -> dict[str, float]:
    """The loss dict KD³ should return for these inputs and options (zero-weight terms absent)."""
    s, t = inp["s_logits"], inp["t_logits"]
    if o.feature_weighting:
        fa = ref_feature_align(inp["projected"], inp["t_map"], s, t)
    else:
        fa = ref_feature_align(inp["projected"], inp["t_map"])
    out = {"feature_align": fa}
    total = o.feature_weight * fa
    if o.mixdistribution and o.mix_weight:
        out["instance_align"] = ref_nt_xent(inp["u"], inp["u_mixed"], o.temperature)
        total += o.mix_weight * out["instance_align"]
    if o.kd_weight:
        out["kd"] = ref_kd(s, t, 4.0, ref_prior(QUERIES, K, rho) if rho else None)
        total += o.kd_weight * out["kd"]
    return {"loss": total, **out}


def ref_alpha(epoch: int, epochs: int, released: bool) -> float:
    """The selection's teacher weight at 0-based ``epoch``: the released code counts e = epoch + 1
    and uses ``1 − exp(−5((e+1)/R − 1)²)`` while ``e < cut``, then 0, with R = 160 and cut = 120
    (of 240 epochs); the scaled schedule stretches them to R = 2E/3 and cut = E/2."""
    e = epoch + 1
    ramp, cut = (160.0, 120.0) if released else (2 * epochs / 3, epochs / 2)
    return 1 - math.exp(-5 * ((e + 1) / ramp - 1) ** 2) if e < cut else 0.0


# --------------------------------------------------------------------------------------------
# fixed inputs
# --------------------------------------------------------------------------------------------


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """float32-representable values (what the torch code computes in), held as float64."""
    rng = np.random.default_rng(2307_11469)
    raw = {
        "projected": np.maximum(rng.normal(0.3, 1.0, (B, C, 3, 3)), 0),  # after the projector's ReLU
        "t_map": np.maximum(rng.normal(0.2, 1.0, (B, C, 3, 3)), 0),
        "t_map_large": np.maximum(rng.normal(0.2, 1.0, (B, C, 6, 6)), 0),  # pooled 2x2 -> 3x3
        "s_logits": rng.normal(0, 1.5, (B, K)),
        "t_logits": rng.normal(0, 3.0, (B, K)),
        "u": unit_rows(rng.normal(size=(B, D))),
        "u_mixed": unit_rows(rng.normal(size=(B, D))),
    }
    raw["u_mixed"] = unit_rows(raw["u"] + 0.5 * raw["u_mixed"])  # the other view: close, not equal
    return {k: v.astype(np.float32).astype(np.float64) for k, v in raw.items()}


def tt(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))


def loss_inputs(inp: dict[str, np.ndarray], map_key: str = "t_map") -> tuple[Any, ...]:
    clean = {"projected": tt(inp["projected"]), "logits": tt(inp["s_logits"]), "embedding": tt(inp["u"])}
    mixed = {"embedding": tt(inp["u_mixed"])}
    return clean, mixed, tt(inp[map_key]), tt(inp["t_logits"])


def close(actual: torch.Tensor | float, expected: float) -> bool:
    value = float(actual.detach()) if isinstance(actual, torch.Tensor) else actual
    return value == pytest.approx(expected, rel=RTOL)


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------


def test_feature_align_matches_the_weighted_and_plain_mse(inputs: dict[str, np.ndarray]) -> None:
    p, f, s, t = (inputs[k] for k in ("projected", "t_map", "s_logits", "t_logits"))
    weighted = ref_feature_align(p, f, s, t)
    plain = ref_feature_align(p, f)
    assert close(feature_align(tt(p), tt(f), tt(s), tt(t)), weighted)
    assert close(feature_align(tt(p), tt(f)), plain)
    assert 0.5 * plain < weighted < plain  # every weight lies in (0.5, 1)


@pytest.mark.parametrize("temperature", [0.07, 0.3, 1.0])
def test_instance_align_matches_nt_xent(inputs: dict[str, np.ndarray], temperature: float) -> None:
    u, v = inputs["u"], inputs["u_mixed"]
    assert close(instance_align(tt(u), tt(v), temperature), ref_nt_xent(u, v, temperature))


@pytest.mark.parametrize("rho", [0.3, 0.7, 0.95])
def test_query_prior_and_kd_with_it_match_the_reference(inputs: dict[str, np.ndarray], rho: float) -> None:
    lp = query_log_prior(torch.from_numpy(QUERIES), K, rho)
    assert np.allclose(lp.double().exp().numpy(), ref_prior(QUERIES, K, rho), rtol=RTOL, atol=0)
    s, t = inputs["s_logits"], inputs["t_logits"]
    assert close(kd_logit(tt(s), tt(t), 4.0, lp), ref_kd(s, t, 4.0, ref_prior(QUERIES, K, rho)))
    assert close(kd_logit(tt(s), tt(t), 4.0), ref_kd(s, t, 4.0))
    assert close(kd_logit(tt(s), tt(t), 2.0), ref_kd(s, t, 2.0))


# --------------------------------------------------------------------------------------------
# KD3Loss: each term and the weighted sum, under every switch that changes it
# --------------------------------------------------------------------------------------------

SWITCHES = {
    "paper": KD3Options(),
    "unweighted": KD3Options(feature_weighting=False),
    "no_mixdistribution": KD3Options(mixdistribution=False),
    "mix_weight_zero": KD3Options(mix_weight=0.0),
    "weights_and_temperature": KD3Options(feature_weight=2.5, mix_weight=0.5, temperature=0.1),
    "kd": KD3Options(kd_weight=1.0),
    "kd_half_only_fa_weights_off": KD3Options(kd_weight=0.5, feature_weighting=False, mixdistribution=False),
}


@pytest.mark.parametrize("name", SWITCHES)
def test_kd3_loss_terms_and_total_match_the_reference(inputs: dict[str, np.ndarray], name: str) -> None:
    o = SWITCHES[name]
    out = KD3Loss(o)(*loss_inputs(inputs))
    ref = ref_terms(inputs, o)
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert close(out[k], v), k


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_kd3_loss_with_the_query_prior_matches_the_reference(inputs: dict[str, np.ndarray], rho: float) -> None:
    o = KD3Options(kd_weight=0.7, query_prior=rho)
    lp = query_log_prior(torch.from_numpy(QUERIES), K, rho)  # what KD3Method passes from the queries
    out = KD3Loss(o)(*loss_inputs(inputs), lp)
    ref = ref_terms(inputs, o, rho)
    assert set(out) == set(ref) and all(close(out[k], v) for k, v in ref.items())
    assert not close(out["kd"], ref_kd(inputs["s_logits"], inputs["t_logits"], 4.0))  # the prior moved it


def test_a_larger_teacher_map_is_pooled_to_the_projection_before_alignment(inputs: dict[str, np.ndarray]) -> None:
    o = KD3Options(kd_weight=1.0)
    out = KD3Loss(o)(*loss_inputs(inputs, "t_map_large"))
    ref = ref_terms({**inputs, "t_map": inputs["t_map_large"]}, o)
    assert all(close(out[k], v) for k, v in ref.items())


def test_the_instance_term_needs_a_second_view(inputs: dict[str, np.ndarray]) -> None:
    clean, _, t_map, t_logits = loss_inputs(inputs)
    out = KD3Loss()(clean, None, t_map, t_logits)
    assert set(out) == {"loss", "feature_align"}
    assert close(out["loss"], ref_terms(inputs, KD3Options())["feature_align"])


# --------------------------------------------------------------------------------------------
# MixDistribution, with the generator's draws recovered through the public API
# --------------------------------------------------------------------------------------------


def mix_with_draws(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MixDistribution's output for ``x`` (float64), the partner permutation it drew (replayed from
    a copy of the seeded generator: the permutation is its first draw) and each image's λ, read
    back from the output's per-channel means: ``mean(x̃_i) = λμ_i + (1−λ)μ_π(i)`` exactly."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    out = mix_distribution(torch.from_numpy(x), g).numpy()
    mu, mu_out = x.mean(axis=(2, 3)), out.mean(axis=(2, 3))  # (B, C)
    d = mu - mu[perm]
    lam = np.where(perm == np.arange(len(x)), np.nan, (d * (mu_out - mu[perm])).sum(1) / (d * d).sum(1).clip(1e-300))
    return out, perm, lam


def ref_mix(x: np.ndarray, perm: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``x̃_i = σ̃ (x_i − μ_i)/σ_i + μ̃`` with ``σ_i = sqrt(var_i + 1e-6)`` (unbiased) per image and
    channel, ``μ̃ = λμ_i + (1−λ)μ_π(i)`` and the same mix of σ."""
    mu = x.mean(axis=(2, 3), keepdims=True)
    sigma = np.sqrt(x.var(axis=(2, 3), ddof=1, keepdims=True) + 1e-6)
    lam = np.nan_to_num(lam, nan=1.0).reshape(-1, 1, 1, 1)  # π(i) = i: any λ leaves the image as it is
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return sigma_mix * (x - mu) / sigma + mu_mix


def test_mix_distribution_matches_the_reference_with_the_same_draws() -> None:
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.2, 3.0, (B, 3, 1, 1))
    shift = rng.uniform(-2.0, 2.0, (B, 3, 1, 1))
    x = rng.normal(size=(B, 3, 5, 5)) * scale + shift  # every image and channel its own statistics
    out, perm, lam = mix_with_draws(x, seed=11)
    moved = perm != np.arange(B)
    assert sorted(perm) == list(range(B)) and moved.sum() >= 2
    assert np.all((lam[moved] >= 0) & (lam[moved] <= 1))
    # one λ per image for every channel and for σ as well as μ: the reference with those draws
    # reproduces the whole output, not only the means λ was read from
    assert np.allclose(out, ref_mix(x, perm, lam), rtol=RTOL, atol=1e-9)


def test_mix_distribution_draws_lambda_from_beta_0_1() -> None:
    n = 4000
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, 1, 4, 4)) + np.arange(n).reshape(n, 1, 1, 1)  # means far apart: λ well determined
    _, perm, lam = mix_with_draws(x, seed=12)
    lam = lam[~np.isnan(lam)]
    # Beta(a, a) has mean 1/2 and variance 1/(4(2a + 1)): 0.2083 for a = 0.1 (0.1786 for a = 0.2,
    # 0.0833 for the uniform), with a standard error near 0.002 here
    assert abs(lam.mean() - 0.5) < 0.03
    assert abs(lam.var() - 1 / (4 * 1.2)) < 0.01
    # mostly near 0 or 1: a share of 0.25 inside (0.05, 0.95) for Beta(0.1, 0.1), 0.42 for Beta(0.2, 0.2)
    assert np.mean((lam > 0.05) & (lam < 0.95)) < 0.35


# --------------------------------------------------------------------------------------------
# KD3Method.forward: the wiring from images to the loss dict
# --------------------------------------------------------------------------------------------

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.mark.parametrize(
    ("student_arch", "options"),
    [
        ("resnet8", KD3Options()),  # the paper's loss, maps of equal size
        ("mobilenetv2", KD3Options(kd_weight=1.0, query_prior=0.7, temperature=0.5)),  # 2x2 vs the teacher's 4x4
    ],
)
def test_method_forward_is_the_reference_loss_of_its_own_views(student_arch: str, options: KD3Options) -> None:
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", K), MEAN, STD)
    method = KD3Method(teacher, build_model(student_arch, K), options, input_size=16)
    x01 = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    queries = torch.from_numpy(QUERIES)
    out = method(x01, torch.Generator().manual_seed(7), queries)

    # the same views through the public API: the normalised batch, and MixDistribution with the same seed
    x = teacher.normalise(x01)
    ref_x = (x01.double().numpy() - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))
    assert np.allclose(x.double().numpy(), ref_x, rtol=RTOL, atol=1e-6)
    with torch.no_grad():
        t_map, t_logits = teacher.features_and_logits(x01)
        clean = method.student.parts(x)
        mixed = method.student.parts(mix_distribution(x, torch.Generator().manual_seed(7)))

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    w, b = f64(teacher.classifier.weight), f64(teacher.classifier.bias)
    head_w, head_b = f64(method.student.head.fc.weight), f64(method.student.head.fc.bias)  # type: ignore[union-attr]

    def logits_and_embedding(projected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``h_T(GAP(P(F_S)))`` with the teacher's own classifier, and ``g_S = normalize(Az + a)``."""
        z = projected.mean(axis=(2, 3))
        return z @ w.T + b, unit_rows(z @ head_w.T + head_b)

    s_logits, u = logits_and_embedding(f64(clean["projected"]))
    _, u_mixed = logits_and_embedding(f64(mixed["projected"]))
    assert np.allclose(f64(t_logits), f64(t_map).mean(axis=(2, 3)) @ w.T + b, rtol=RTOL, atol=1e-6)
    assert np.allclose(f64(clean["logits"]), s_logits, rtol=RTOL, atol=1e-6)  # the shared classifier
    ref_inputs = {
        "projected": f64(clean["projected"]),
        "t_map": f64(t_map),
        "s_logits": s_logits,
        "t_logits": f64(t_logits),
        "u": u,
        "u_mixed": u_mixed,
    }
    ref = ref_terms(ref_inputs, options, options.query_prior)
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert close(out[k], v), k


def test_released_head_wiring_embeds_the_backbone_feature_and_keeps_the_projector_off_the_mixed_view() -> None:
    """``contrastive_head: backbone``: g_S on GAP(F_S) of each view; the projector (and its BatchNorm
    statistics) sees the clean view only, as in the released code."""
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", K), MEAN, STD)
    method = KD3Method(teacher, build_model("resnet8", K), KD3Options(contrastive_head="backbone"), input_size=16)
    x01 = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = teacher.normalise(x01)
    head_w = method.student.head.fc.weight.detach().double().numpy()  # type: ignore[union-attr]
    head_b = method.student.head.fc.bias.detach().double().numpy()  # type: ignore[union-attr]
    assert head_w.shape[1] == method.student.backbone.feature_dim  # sized for the backbone, not the projector
    with torch.no_grad():
        clean = method.student.eval().parts(x)
        feats = method.student.backbone.forward_features(x).double().numpy()
        mixed_x = mix_distribution(x, torch.Generator().manual_seed(7))
        mixed_feats = method.student.backbone.forward_features(mixed_x).double().numpy()
        u_mixed = method.student.embed(mixed_x).double().numpy()
    u = unit_rows(feats.mean(axis=(2, 3)) @ head_w.T + head_b)
    assert np.allclose(clean["embedding"].double().numpy(), u, rtol=RTOL, atol=1e-6)
    assert np.allclose(u_mixed, unit_rows(mixed_feats.mean(axis=(2, 3)) @ head_w.T + head_b), rtol=RTOL, atol=1e-6)
    # in training, one step's BatchNorm statistics of the projector come from the clean view alone
    method.train()
    bn = [m for m in method.student.projector.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    method(x01, torch.Generator().manual_seed(7))
    with torch.no_grad():
        first = method.student.projector.net[0](method.student.backbone.forward_features(x))
    momentum = bn.momentum or 0.1
    expected = (1 - momentum) * before + momentum * first.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the α schedule, and the selection that uses it
# --------------------------------------------------------------------------------------------

# α by 0-based epoch, worked out by hand from the formula (E = 240 values are the released table's)
ALPHA_TABLE = {
    ("scaled", 240): {0: 0.9924, 19: 0.9770, 59: 0.8525, 99: 0.4933, 118: 0.2684, 119: 0.0},
    ("released", 240): {0: 0.9924, 19: 0.9770, 59: 0.8525, 99: 0.4933, 118: 0.2684, 119: 0.0},
    ("scaled", 15): {0: 0.9592, 3: 0.7135, 6: 0.1813, 7: 0.0, 14: 0.0},
    ("released", 15): {0: 0.9924, 7: 0.9884, 14: 0.9826},
    ("scaled", 30): {0: 0.9826, 13: 0.2684, 14: 0.0},
}


@pytest.mark.parametrize(("schedule", "epochs"), list(ALPHA_TABLE))
def test_alpha_schedule_golden_values(schedule: str, epochs: int) -> None:
    released = schedule == "released"
    for epoch, value in ALPHA_TABLE[schedule, epochs].items():
        assert ref_alpha(epoch, epochs, released) == pytest.approx(value, abs=5e-5)
    for epoch in range(epochs):
        assert alpha_schedule(epoch, epochs, released=released) == pytest.approx(
            ref_alpha(epoch, epochs, released), rel=1e-12, abs=1e-12
        )


def ref_select(
    t: np.ndarray, s: np.ndarray, alpha: float, tau: float, adaptive: bool, pi: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``q = softmax(α o_T + (1−α) o_S)`` (times π, renormalised), ``c = max q``, ``ŷ = argmax q``;
    keep ``c > τ_ŷ`` with ``τ_k = τ β_k/(2 − β_k)``, ``β_k = N_k / max N`` (or ``τ`` for all)."""
    q = softmax(alpha * t + (1 - alpha) * s)
    if pi is not None:
        q = q * pi / (q * pi).sum(axis=1, keepdims=True)
    conf, pred = q.max(axis=1), q.argmax(axis=1)
    if not adaptive:
        return conf > tau, pred
    counts = np.bincount(pred, minlength=t.shape[1]).astype(np.float64)
    beta = counts / counts.max()
    return conf > (tau * beta / (2 - beta))[pred], pred


@pytest.fixture(scope="module")
def tiny_teacher() -> Teacher:
    torch.manual_seed(0)
    return Teacher(build_model("resnet8", K), MEAN, STD)


@pytest.mark.parametrize("schedule", ["scaled", "released"])
@pytest.mark.parametrize(("adaptive", "rho"), [(True, 0.0), (False, 0.0), (True, 0.6)])
def test_select_uses_the_schedules_alpha_thresholds_and_prior(
    tiny_teacher: Teacher, schedule: str, adaptive: bool, rho: float
) -> None:
    rng = np.random.default_rng(5)
    n, epochs = 60, 15
    t = rng.normal(0, 3.0, (n, K)).astype(np.float32).astype(np.float64)
    s = rng.normal(0, 3.0, (n, K)).astype(np.float32).astype(np.float64)
    queries = np.resize(QUERIES, n)
    o = KD3Options(alpha_schedule=schedule, adaptive_thresholds=adaptive, query_prior=rho, tau=0.8)  # type: ignore[arg-type]
    method = KD3Method(tiny_teacher, build_model("resnet8", K), o, input_size=16)
    pi = ref_prior(queries, K, rho) if rho else None
    kept = []
    for epoch in range(epochs):
        mask, pred = method.select(epoch, epochs, tt(t), tt(s), torch.from_numpy(queries))
        ref_mask, ref_pred = ref_select(t, s, ref_alpha(epoch, epochs, schedule == "released"), 0.8, adaptive, pi)
        assert pred.tolist() == ref_pred.tolist(), epoch
        assert mask.tolist() == ref_mask.tolist(), epoch
        kept.append(int(mask.sum()))
    assert 0 < min(kept) and max(kept) < n  # the thresholds bind: some kept, some dropped, every epoch
