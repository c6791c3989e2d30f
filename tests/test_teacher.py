"""Teacher checkpoints: unsafe, broken, mismatched or numerically unusable files, and the supported formats.

(The ``t<n>`` in the test names number the hazards; plain torchvision checkpoints have their own file.)
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch

from distill.models import build_model
from distill.teacher import Teacher, TeacherError, TeacherSpec, load_teacher

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def spec(path: Path, **kw: object) -> TeacherSpec:
    return TeacherSpec(
        checkpoint=str(path), num_classes=kw.pop("num_classes", 10), arch=kw.pop("arch", "resnet8"), **kw
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("resnet8", 10).state_dict()


@pytest.fixture()
def good(tmp_path: Path, weights: dict[str, torch.Tensor]) -> Path:
    p = tmp_path / "teacher.pt"
    torch.save(weights, p)
    return p


def load(path: Path, **kw: object) -> Teacher:
    return load_teacher(spec(path, **kw), MEAN, STD)


def test_a_plain_state_dict_loads_frozen_and_in_eval(good: Path, weights: dict[str, torch.Tensor]) -> None:
    teacher = load(good)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert torch.equal(teacher.model.state_dict()["classifier.weight"], weights["classifier.weight"])
    x = torch.rand(2, 3, 32, 32)
    assert teacher(x).shape == (2, 10) and teacher.features(x).shape[:2] == (2, 64)


@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_pickle_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_env: bool) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Evil(marker)}, p)
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(TeacherError, match=r"unsafe checkpoint \(non-allowlisted globals: getattr\)"):
        load(p)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path: Path, good: Path) -> None:
    p = tmp_path / "half.pt"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherError, match=f"{p}: checkpoint corrupt or truncated"):
        load(p)


def test_empty_random_folder_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    cases = {
        tmp_path / "empty.pt": "checkpoint file is empty",
        tmp_path / "random.pt": "not a PyTorch checkpoint",
        tmp_path: "is a folder",
        tmp_path / "missing.pt": "teacher checkpoint not found",
    }
    for path, message in cases.items():
        with pytest.raises(TeacherError, match=f"{path}: {message}"):
            load(path)


def test_torchscript_without_the_format_is_refused_unloaded(tmp_path: Path) -> None:
    model = build_model("resnet8", 10).eval()
    p = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch >= 2.10
        torch.jit.trace(model, torch.rand(1, 3, 32, 32)).save(str(p))
    with pytest.raises(TeacherError, match="unsupported format: this is a torchscript archive; it was not loaded"):
        load(p)
    teacher = load(p, format="torchscript")  # named explicitly: accepted
    assert teacher(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_wrong_architecture_lists_the_first_mismatches(good: Path) -> None:
    with pytest.raises(TeacherError, match=r"does not match architecture 'resnet14': missing \d+ keys \(first: "):
        load(good, arch="resnet14")
    with pytest.raises(
        TeacherError, match=r"shape mismatches \(first: conv1.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"
    ):
        load(good, arch="resnet8x4")


def test_output_size_differs_from_the_class_list(good: Path) -> None:
    with pytest.raises(TeacherError, match="the teacher has 10 outputs but the class list has 7 classes"):
        load(good, num_classes=7)


def test_non_finite_weights(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    bad = {k: v.clone() for k, v in weights.items()}
    bad["classifier.weight"][0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(bad, p)
    with pytest.raises(TeacherError, match=r"non-finite weights \(NaN or inf\) in 'classifier.weight'"):
        load(p)


def test_finite_weights_with_non_finite_outputs_are_refused(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    bad = {k: v.clone() for k, v in weights.items()}
    bad["bn1.running_var"][0] = -1.0  # finite, but sqrt(var + eps) is NaN for every input
    p = tmp_path / "negvar.pt"
    torch.save(bad, p)
    with pytest.raises(
        TeacherError,
        match=rf"{p}: produces non-finite outputs \(NaN/inf\) on a probe batch.*"
        r"check BatchNorm running statistics \(negative running_var in "
        r"bn1.running_var\)",
    ):
        load(p)
    from distill.teacher import probe_batch

    assert torch.equal(probe_batch(3, 8), probe_batch(3, 8)) and probe_batch(1, 8).shape == (4, 1, 8, 8)


def test_a_teacher_that_fails_on_the_input_size_is_a_teacher_error(tmp_path: Path) -> None:
    class FixedSize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != 224:
                raise RuntimeError("expects 224 x 224 inputs")
            return x.mean((2, 3))

    p = tmp_path / "fixed.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch >= 2.10
        torch.jit.script(FixedSize()).save(str(p))
    with pytest.raises(TeacherError, match=f"{p}: the teacher fails on 32x32 inputs .*expects 224 x 224 inputs"):
        load(p, format="torchscript", num_classes=3)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], header_len: int | None = None) -> None:
    header, blobs, offset = {}, [], 0
    for k, v in tensors.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len or len(h)) + h + b"".join(blobs))


def test_safetensors_good_and_corrupt(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    floats = {k: v.float() for k, v in weights.items()}
    good = tmp_path / "t.safetensors"
    write_safetensors(good, floats)
    assert load(good)(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    huge = tmp_path / "huge.safetensors"
    write_safetensors(huge, floats, header_len=2**60)
    with pytest.raises(TeacherError, match="corrupt safetensors header"):
        load(huge)
    garbled = tmp_path / "garbled.safetensors"
    data = bytearray(good.read_bytes())
    data[8:10] = b"{{"  # the JSON header no longer parses
    garbled.write_bytes(bytes(data))
    with pytest.raises(TeacherError, match="corrupt safetensors"):
        load(garbled)


def raw_safetensors(path: Path, header: bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A .safetensors file with a hand-made header, for the hostile cases no writer produces."""
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)
    return path


def test_safetensors_negative_shape_names_the_file(tmp_path: Path) -> None:
    entry = {"conv1.weight": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}
    p = raw_safetensors(tmp_path / "neg.safetensors", json.dumps(entry).encode(), bytes(16))
    with pytest.raises(TeacherError, match=f"^{re.escape(str(p))}: corrupt safetensors header: a negative"):
        load(p)


def test_safetensors_header_nested_10000_deep_names_the_file(tmp_path: Path) -> None:
    p = raw_safetensors(tmp_path / "deep.safetensors", b'{"a":' * 10_000 + b"1" + b"}" * 10_000)
    with pytest.raises(TeacherError, match=f"^{re.escape(str(p))}: corrupt safetensors header: .*nested too deeply"):
        load(p)


def test_safetensors_header_claiming_2_62_bytes_names_the_file(tmp_path: Path) -> None:
    entry = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    p = raw_safetensors(tmp_path / "claims.safetensors", json.dumps(entry).encode(), bytes(4), header_len=2**62)
    with pytest.raises(TeacherError, match=f"^{re.escape(str(p))}: corrupt safetensors header .*{2**62} header bytes"):
        load(p)


def test_safetensors_unusable_dtype_or_entry_outside_the_file_names_the_file(tmp_path: Path) -> None:
    fp8 = {"conv1.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    p = raw_safetensors(tmp_path / "fp8.safetensors", json.dumps(fp8).encode(), bytes(4))
    with pytest.raises(TeacherError, match=f"^{re.escape(str(p))}: .*'conv1.weight' has dtype F8_E4M3"):
        load(p)
    outside = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    p = raw_safetensors(tmp_path / "outside.safetensors", json.dumps(outside).encode(), bytes(4))
    with pytest.raises(TeacherError, match=f"^{re.escape(str(p))}: corrupt safetensors file: a tensor points outside"):
        load(p)


def test_torchvision_resnet18_saved_by_safetensors_loads_into_its_own_memory(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = torchvision.models.resnet18(num_classes=10).state_dict()
    p = tmp_path / "resnet18.safetensors"
    save_file(weights, str(p))
    loaded = load(p, arch="torchvision/resnet18").model.state_dict()
    p.write_bytes(b"")  # a memory-mapped tensor would now fault (SIGBUS) when read
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        got = loaded[key]
        assert got.device.type == "cpu" and got.dtype == value.dtype and torch.equal(got, value), key


@pytest.mark.slow
def test_a_checkpoint_that_needs_too_much_memory_fails_in_the_child(tmp_path: Path) -> None:
    p = tmp_path / "big.pt"
    torch.save({"conv1.weight": torch.zeros(40_000_000)}, p)  # 160 MB of tensor data
    with pytest.raises(TeacherError, match="more memory than teacher.memory_limit_mb"):
        load(p, memory_limit_mb=64)
    assert os.getpid() > 0  # we are alive


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module", "both"])
def test_common_wrappers_are_accepted(tmp_path: Path, weights: dict[str, torch.Tensor], wrap: str) -> None:
    sd: dict = dict(weights)  # type: ignore[type-arg]
    if wrap in ("module", "both"):
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {wrap: sd, "epoch": 3} if wrap in ("state_dict", "model") else {"state_dict": sd} if wrap == "both" else sd
    p = tmp_path / "wrapped.pt"
    torch.save(obj, p)
    assert torch.equal(load(p).model.state_dict()["classifier.bias"], weights["classifier.bias"])


def test_file_over_the_size_cap_is_refused_before_reading(good: Path) -> None:
    with pytest.raises(TeacherError, match="over the cap of 1000"):
        load(good, max_bytes=1000)


def test_named_feature_and_classifier_layers(tmp_path: Path) -> None:
    from distill.models import FeatureAccessError, set_feature_access

    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    p = tmp_path / "t.pt"
    torch.save(model.state_dict(), p)
    teacher = load(p, feature_layer="layers", classifier_layer="classifier")  # the defaults, named
    assert teacher.features(torch.rand(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    with pytest.raises(TeacherError, match="go together"):
        load(p, feature_layer="layers")
    with pytest.raises(FeatureAccessError, match="does not reproduce the model's logits"):
        set_feature_access(build_model("resnet8", 10), "layers.1", "classifier")  # not the pooled map
    with pytest.raises(FeatureAccessError, match="some module names of this model: conv1"):
        set_feature_access(build_model("resnet8", 10), "nope", "classifier")
    vgg = build_model("vgg11", 10)  # no default access, and its head is not a single linear layer
    with pytest.raises(FeatureAccessError, match="does not reproduce"):
        set_feature_access(vgg, "features", "classifier.6")  # torchvision's own module names
