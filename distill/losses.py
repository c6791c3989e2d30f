"""Loss terms and selection rules of KD³ and the baselines, as pure functions.

Each function takes tensors and returns a tensor; none holds state. The KD³ loss module and the
trainer (the next issue) combine them into a dict ``{"loss": total, <term>: value, ...}``.

- ``kd_logit``: Hinton KD, ``T² · KL(softmax(o_T/T) ‖ softmax(o_S/T))`` (section 7).
- ``feature_align``: weighted feature alignment, ``mean(w_i · (P(F_S) − F_T)²)`` with
  ``w_i = sigmoid(‖o_S − o_T‖₂)`` and no gradient through ``w`` (section 4.1).
- ``instance_align``: NT-Xent between the clean and perturbed views' embeddings (section 4.3).
- ``noise_adapt``: DFND's noise adaptation, ``NLL(log(softmax(o_S) Q), ŷ_T)`` (section 7).
- ``mix_distribution``: MixDistribution on a normalised input batch (section 4.3).
- ``alpha_schedule``, ``class_thresholds``, ``select_instances``: the per-epoch dynamic instance
  selection (section 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from distill.data import to_device

# --------------------------------------------------------------------------------------------
# loss terms
# --------------------------------------------------------------------------------------------


def kd_logit(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    log_prior: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al. 2015: ``T² · KL(p_T ‖ p_S)`` at temperature T, averaged over the batch.

    Shapes: (B, K), (B, K) -> scalar. The teacher side carries no gradient. With ``log_prior``
    (B, K) the target is ``p_T ∝ softmax(o_T/T) · π`` (ours: the crawl query as a prior, see
    ``query_log_prior``, or the annotator model's, ``distill.label.AnnotatorPrior``). With
    ``weight`` (B,) each image's KL counts that much in the mean over the batch.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    target = teacher_logits.detach() / t
    if log_prior is not None:
        target = target + log_prior
    log_p_t = F.log_softmax(target, dim=1)
    if weight is None:
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)  # (B,)
    return (weight.detach() * kl).mean() * t * t


def feature_align(
    projected: torch.Tensor,
    teacher_map: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD³ eq. (weighted feature alignment): ``mean over all elements of w_i · (P(F_S)_i − F_T_i)²``.

    ``projected`` and ``teacher_map`` are (B, C, H, W) (``teacher_map`` after any pooling);
    ``w_i = sigmoid(‖o_S,i − o_T,i‖₂)`` ∈ (0.5, 1) is computed without gradient, so samples the
    student still gets wrong weigh more. Without logits, ``w = 1`` (plain MSE, the ablation).
    """
    sq = (projected - teacher_map.detach()) ** 2  # (B, C, H, W)
    if student_logits is None or teacher_logits is None:
        return sq.mean()
    with torch.no_grad():
        w = torch.sigmoid(torch.linalg.vector_norm(student_logits - teacher_logits, dim=1))  # (B,)
    return (w.view(-1, 1, 1, 1) * sq).mean()


def instance_align(u: torch.Tensor, u_tilde: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """NT-Xent (SimCLR) between two views: each of the 2B embeddings has its other view as the
    positive and the other 2B−2 as negatives; mean over the 2B anchors.

    ``u``, ``u_tilde``: (B, D), L2-normalised by the heads.
    """
    b = u.shape[0]
    z = torch.cat([u, u_tilde], dim=0)  # (2B, D)
    sim = z @ z.t() / temperature  # (2B, 2B) cosine similarities / t
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b, device=z.device), torch.arange(0, b, device=z.device)])
    return F.cross_entropy(sim, positives)


def query_log_prior(query: torch.Tensor, num_classes: int, rho: float) -> torch.Tensor:
    """Ours (not in the paper): the class a web image was crawled for, as a prior over its label.

    ``log π`` with ``π_q = ρ`` for the query class ``q`` and ``(1 − ρ)/(K − 1)`` for the others;
    rows with ``q < 0`` (several queries found the image) are uniform. (B,) -> (B, K).
    """
    k = num_classes
    rest = math.log((1 - rho) / (k - 1)) if rho < 1 else -30.0
    hit = math.log(rho) if rho > 0 else -30.0
    # where with Python scalars, not boolean-mask indexing (it needs the mask's count on the host, a
    # GPU sync) nor scalar tensors (a host-to-device copy each, every step)
    is_query = query[:, None] == torch.arange(k, device=query.device)
    return torch.where((query >= 0)[:, None], torch.where(is_query, hit, rest), -math.log(k))


def transition_matrix(theta: torch.Tensor, accuracy: float) -> torch.Tensor:
    """DFND's row-stochastic K×K noise matrix: diagonal fixed to ``accuracy``, each row's
    off-diagonal entries ``(1 − accuracy) · softmax(θ_i)`` over the other K−1 classes.
    """
    k = theta.shape[0]
    eye = torch.eye(k, dtype=torch.bool, device=theta.device)
    off = torch.softmax(theta.masked_fill(eye, float("-inf")), dim=1) * (1.0 - accuracy)
    return off + eye.to(theta.dtype) * accuracy


def noise_adapt(student_logits: torch.Tensor, teacher_labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """DFND: ``NLL(log(softmax(o_S) Q), ŷ_T)``: the student's clean posterior pushed through the
    label-noise model ``Q`` should explain the teacher's (noisy) argmax labels."""
    noisy = torch.softmax(student_logits, dim=1) @ q  # (B, K), rows still sum to 1
    return F.nll_loss(torch.log(noisy.clamp_min(1e-12)), teacher_labels)


# --------------------------------------------------------------------------------------------
# MixDistribution
# --------------------------------------------------------------------------------------------


def mix_distribution(x: torch.Tensor, generator: torch.Generator | None = None, alpha: float = 0.1) -> torch.Tensor:
    """Mix per-image channel statistics with a random partner (MixStyle at the input).

    ``x``: normalised batch (B, C, H, W). ``μ_i``, ``σ_i = sqrt(var_i + 1e-6)`` (unbiased) per
    image and channel, detached; ``λ ~ Beta(α, α)``; ``x̃_i = σ̃ (x_i − μ_i)/σ_i + μ̃`` with
    ``μ̃ = λμ_i + (1−λ)μ_π(i)`` and the same for σ.
    """
    b = x.shape[0]
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=True) + 1e-6).sqrt().detach()
    perm = to_device(torch.randperm(b, generator=generator), x.device)
    # λ ~ Beta(α, α), drawn as torch's Beta draws it (the first share of a Dirichlet(α, α)) but from
    # ``generator``: no global generator is seeded or read
    conc = torch.full((b, 2), alpha)
    lam = torch._sample_dirichlet(conc, generator=generator)[:, 0].view(b, 1, 1, 1)
    lam = to_device(lam, x.device).to(x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return sigma_mix * (x - mu) / sigma + mu_mix


# --------------------------------------------------------------------------------------------
# dynamic instance selection
# --------------------------------------------------------------------------------------------


def alpha_schedule(epoch: int, epochs: int, released: bool = False) -> float:
    """Teacher weight α in the combined logits for the 0-based ``epoch`` of ``epochs``.

    The released code counts epochs from t = 1 and uses ``α_t = 1 − exp(−5((t+1)/160 − 1)²)`` for
    ``t < 120``, else 0 (with E = 240 epochs); here t = epoch + 1. By default the ramp 160 becomes
    2E/3 and the cut 120 becomes E/2, so a short run follows the same shape; ``released`` keeps the
    constants as they are (a run of E < 120 epochs then never leaves α ≈ 1: the teacher decides).
    """
    ramp, cut = (160.0, 120.0) if released else (2 * epochs / 3, epochs / 2)
    t = epoch + 1
    if t >= cut:
        return 0.0
    return 1.0 - math.exp(-5.0 * ((t + 1) / ramp - 1.0) ** 2)


def class_thresholds(pred: torch.Tensor, num_classes: int, tau: float = 0.95) -> torch.Tensor:
    """FlexMatch-style thresholds ``τ_k = τ · β_k / (2 − β_k)``, ``β_k = N_k / max N`` (K,)."""
    counts = torch.bincount(pred, minlength=num_classes).float()
    beta = counts / counts.max().clamp_min(1)
    return tau * beta / (2 - beta)


def select_instances(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    alpha: float,
    tau: float = 0.95,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``c_j > τ_ŷj`` on ``softmax(α o_T + (1−α) o_S)``; returns (mask (N,), pseudo-class (N,)).

    The pseudo-class only chooses the subset: no KD³ loss uses it. ``weight`` (N,) scales each
    confidence (ours: P(not junk) from the annotator model).
    """
    q = torch.softmax(alpha * teacher_logits + (1 - alpha) * student_logits, dim=1)
    conf, pred = q.max(dim=1)
    if weight is not None:
        conf = conf * weight
    thresholds = class_thresholds(pred, q.shape[1], tau)
    return conf > thresholds[pred], pred
