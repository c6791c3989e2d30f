"""KD³ wiring: the shared frozen classifier, the projector, and the named loss terms with their switches."""

from __future__ import annotations

import pytest
import torch

from distill.losses import mix_distribution
from distill.methods.kd3 import KD3Loss, KD3Options, KD3Student
from distill.models import build_model


@pytest.fixture()
def pair() -> tuple[torch.nn.Module, KD3Student]:
    torch.manual_seed(0)
    teacher = build_model("resnet8x4", 10).eval()  # 256-channel 8x8 map
    student = KD3Student(build_model("resnet8", 10), teacher.classifier, teacher_channels=256, teacher_hw=8)
    return teacher, student


def test_student_logits_use_the_teachers_frozen_classifier(pair) -> None:  # type: ignore[no-untyped-def]
    teacher, student = pair
    x = torch.rand(4, 3, 32, 32)
    parts = student.parts(x)
    assert parts["projected"].shape == (4, 256, 8, 8) and parts["logits"].shape == (4, 10)
    assert parts["embedding"].shape == (4, 128) and torch.allclose(parts["embedding"].norm(dim=1), torch.ones(4))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert not student.classifier.weight.requires_grad
    assert torch.allclose(student(x), parts["logits"])


def test_loss_terms_gradients_and_total(pair) -> None:  # type: ignore[no-untyped-def]
    teacher, student = pair
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        t_map = teacher.forward_features(x)
        t_logits = teacher.forward_head(t_map)
    loss_fn = KD3Loss()
    out = loss_fn(
        student.parts(x), student.parts(mix_distribution(x, torch.Generator().manual_seed(0))), t_map, t_logits
    )
    assert set(out) == {"loss", "feature_align", "instance_align"}
    assert torch.allclose(out["loss"], out["feature_align"] + 0.001 * out["instance_align"])
    out["loss"].backward()
    assert student.backbone.conv1.weight.grad is not None and student.projector.net[0].weight.grad is not None
    assert student.head.fc.weight.grad is not None and student.classifier.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert "sigmoid" in loss_fn.describe() and "NT-Xent" in loss_fn.describe()


def test_switches(pair) -> None:  # type: ignore[no-untyped-def]
    teacher, student = pair
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        t_map = teacher.forward_features(x)
        t_logits = teacher.forward_head(t_map)
        clean = student.parts(x)
        plain = KD3Loss(KD3Options(feature_weighting=False, mixdistribution=False))(clean, None, t_map, t_logits)
    assert set(plain) == {"loss", "feature_align"}
    assert torch.allclose(plain["feature_align"], ((clean["projected"] - t_map) ** 2).mean())  # unweighted MSE
    own = KD3Student(build_model("resnet8", 10), teacher.classifier, 256, 8, shared_classifier=False)
    assert own.classifier.weight.requires_grad and not torch.equal(own.classifier.weight, teacher.classifier.weight)


def test_a_larger_student_map_is_pooled_to_the_teachers_size() -> None:
    teacher = build_model("resnet18", 10)  # 512 channels at 4x4
    student = KD3Student(build_model("resnet8", 10), teacher.classifier, 512, teacher_hw=4)
    assert student.project(torch.rand(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_without_sharing_the_students_own_classifier_learns_by_kd() -> None:
    from distill.methods.kd3 import KD3Method
    from distill.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", 10), [0.5] * 3, [0.25] * 3)  # frozen: its parameters do not train
    method = KD3Method(teacher, build_model("resnet8", 10), KD3Options(shared_classifier=False), input_size=32)
    clf = method.student.classifier
    assert all(p.requires_grad for p in clf.parameters()) and not torch.equal(clf.weight, teacher.classifier.weight)
    assert "kd" in method.loss_fn.describe().lower()
    out = method(torch.rand(4, 3, 32, 32), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["kd"] > 0 and clf.weight.grad is not None and clf.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_released_alpha_constants_are_a_switch() -> None:
    from distill.methods.kd3 import KD3Method
    from distill.teacher import Teacher

    teacher = Teacher(build_model("resnet8", 3), [0.5] * 3, [0.25] * 3)
    t = torch.tensor([[4.0, 0.0, 0.0]] * 4)  # the teacher says class 0 ...
    s = torch.tensor([[0.0, 0.0, 4.0]] * 4)  # ... the student class 2
    picks = {}
    for schedule in ("scaled", "released"):
        method = KD3Method(teacher, build_model("resnet8", 3), KD3Options(alpha_schedule=schedule), input_size=32)
        picks[schedule] = method.select(10, 15, t, s)[1]  # epoch 11 of 15: past the scaled cut (7.5)
    assert (picks["scaled"] == 2).all()  # α = 0: the student decides
    assert (picks["released"] == 0).all()  # α ≈ 0.98: the teacher decides
