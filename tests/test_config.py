"""params.yaml validation and the shipped params file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (
    SECTIONS,
    CleanConfig,
    ConfigError,
    CrawlConfig,
    DistillConfig,
    EvaluateConfig,
    LabelConfig,
    TeacherConfig,
    WorldConfig,
    load_section,
    parse_shard,
)

from conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_shipped_params_load_and_match_the_defaults_where_documented() -> None:
    crawl = load_section(REPO / "params.yaml", "crawl", CrawlConfig)
    assert load_section(REPO / "params.yaml", "clean", CleanConfig) == CleanConfig()  # the file states the defaults
    assert load_section(REPO / "params.yaml", "teacher", TeacherConfig) == TeacherConfig()
    for name, cls in (("label", LabelConfig), ("distill", DistillConfig), ("evaluate", EvaluateConfig)):
        load_section(REPO / "params.yaml", name, cls)
    world = load_section(REPO / "params.yaml", "world", WorldConfig)
    assert crawl.engines == ["mirror"] and crawl.per_class == 300
    assert world.first == 30000 and world.last == 60000


def test_missing_section_gives_defaults(tmp_path: Path) -> None:
    cfg = load_section(write(tmp_path, "world: {}\n"), "crawl", CrawlConfig)
    assert cfg == CrawlConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crawl:\n  per_clas: 3\n", r"params.yaml: crawl.per_clas: unknown key"),  # typo
        ("crawl:\n  http:\n    retires: 3\n", r"crawl.http.retires: unknown key"),
        ("crawl:\n  per_class: ten\n", r"crawl.per_class: expected an integer, got 'ten'"),
        ("crawl:\n  per_class: 0\n", r"crawl.per_class: 0 is out of range, allowed \[1, 100000\]"),
        ("crawl:\n  http:\n    read_timeout_s: -1\n", r"crawl.http.read_timeout_s: -1.0 is out of range"),
        (
            "crawl:\n  http:\n    connect_timeout_s: 0\n",
            r"crawl.http.connect_timeout_s: 0.0 is out of range, allowed \(0.01",
        ),
        ("crawl:\n  per_class: 1e9\n", r"crawl.per_class: expected an integer"),  # (YAML reads 1e9 as a string)
        ("crawl:\n  per_class: 1000000000\n", r"crawl.per_class: 1000000000 is out of range"),
        ("crawl:\n  engines: [bingo]\n", r"crawl.engines: 'bingo' is not one of baidu, bing, flickr"),
        ("crawl:\n  engines: []\n", r"crawl.engines: at least one engine"),
        ("crawl:\n  queries: ['{nam}']\n", r"crawl.queries: template '\{nam\}' has no \{name\}"),
        ("crawl:\n  shard: 3/2\n", r"crawl.shard: expected 0 <= i < n"),
        ("crawl:\n  progress: 'yes'\n", r"crawl.progress: expected true/false"),
        ("crawl:\n  engines: [urls]\n  urls_file: null\n", r"crawl.urls_file: required when engine 'urls'"),
        ("crawl: [1, 2]\n", r"crawl: expected a mapping"),
        ("world:\n  mix: {correct: 0.5}\n", r"world.mix: fractions must sum to 1"),
        ("world:\n  first: 100\n  last: 50\n", r"world.last: must be greater than first"),
        ("world:\n  render: {formats: {GIF: 1.0}}\n", r"world.render.formats"),
        ("clean:\n  hash_size: 12\n", r"clean.hash_size: 12 gives 144 bits"),
        ("clean:\n  hamming: 65\n", r"clean.hamming: 65 exceeds the 64 bits"),
        ("clean:\n  resize: squash\n", r"clean.resize: 'squash' is not one of crop, pad"),
        ("clean:\n  formats: [JPEG, TIFF]\n", r"clean.formats\[1\]: 'TIFF' is not one of"),
        ("clean:\n  image_size: 100000\n", r"clean.image_size: 100000 is out of range"),
        ("clean:\n  verify_mad: -1\n", r"clean.verify_mad: -1.0 is out of range"),
        ("teacher:\n  format: pickle\n", r"teacher.format: 'pickle' is not one of state_dict, torchscript"),
        ("teacher:\n  mean: [0.5]\n", r"teacher.mean/std: need 3 values each"),
        ("teacher:\n  std: [1, 0, 1]\n", r"teacher.std: 0.0 is out of range, allowed \(0"),
        ("teacher:\n  demo: {epochs: 0}\n", r"teacher.demo.epochs: 0 is out of range"),
        ("label:\n  device: tpu\n", r"label.device: 'tpu' is not one of auto, cpu, cuda"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    cls = SECTIONS[text.split(":")[0]]
    with pytest.raises(ConfigError, match=message) as e:
        load_section(p, text.split(":")[0], cls)
    assert str(p) in str(e.value)


def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 12):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    p = write(tmp_path, "\n".join(lines) + "\ncrawl: {}\n")
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_section(p, "crawl", CrawlConfig)


def test_huge_params_file_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "crawl: {}\n" + "#" * 1_100_000 + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_section(p, "crawl", CrawlConfig)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_section(write(tmp_path, "crawl: [\n"), "crawl", CrawlConfig)
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "crawl", CrawlConfig)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "crawl:\n  per_class: 10\n")
    assert load_section(p, "crawl", CrawlConfig, {"per_class": 5, "http.workers": 2}).http.workers == 2
    with pytest.raises(ConfigError, match="crawl.http.workers: 0 is out of range"):
        load_section(p, "crawl", CrawlConfig, {"http.workers": 0})


def test_config_is_frozen() -> None:
    cfg = CrawlConfig()
    with pytest.raises(AttributeError):
        cfg.per_class = 3  # type: ignore[misc]


def test_dvc_yaml_params_are_config_fields() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"kd3 {name}"
        for key in stage.get("params", []):
            section, *rest = key.split(".")
            cls = SECTIONS[section]
            if rest:
                assert rest[0] in cls.__dataclass_fields__, key


def test_parse_shard() -> None:
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1", "-1/2", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_the_packed_side_follows_the_teacher_unless_set() -> None:
    from pipeline.config import CleanConfig, resolve_image_size

    assert resolve_image_size(CleanConfig(), 32) == 48 and resolve_image_size(CleanConfig(), 224) == 336
    assert resolve_image_size(CleanConfig(image_size=64), 64) == 64
    with pytest.raises(ConfigError, match="clean.image_size: 48 is smaller than teacher.input_size 64"):
        resolve_image_size(CleanConfig(image_size=48), 64)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crawl:\n  per_class: 10\n  per_class: 20\n", r"line 3: duplicate key 'per_class' \(first set on line 2\)"),
        ("crawl:\n  1: 10\n", r"line 2: key 1 is not a name"),
        ("crawl:\n  http:\n    null: 3\n", r"line 3: key None is not a name"),
        ("crawl: " + "[" * 5000 + "]" * 5000 + "\n", r"line 1: nested more than 32 levels deep"),
        ("crawl:" + "".join(f"\n{'  ' * i}k{i}:" for i in range(1, 60)) + " 1\n", r"nested more than 32 levels"),
    ],
)
def test_params_yaml_pitfalls_are_errors_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_section(p, "crawl", CrawlConfig)
    assert str(e.value).startswith(str(p))


def test_kd3_check_validates_every_section_and_the_files_they_name(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    write(tmp_path, "crawl: {per_class: 10}\n")
    run = CliRunner().invoke
    ok = run(app, ["check", "--params", "params.yaml"])
    assert ok.exit_code == 0 and f"{len(SECTIONS)} sections valid" in ok.output and "clean packs 48 px" in ok.output
    write(tmp_path, "crawl: {per_class: 10}\ndistill: {kd3: {tua: 0.9}}\n")  # a typo in a later stage
    bad = run(app, ["check", "--params", "params.yaml"])
    assert bad.exit_code == 2 and "distill.kd3.tua: unknown key" in bad.output
    write(tmp_path, "crawl: {per_class: 10}\ntaecher: {}\n")
    assert "taecher: unknown section" in run(app, ["check", "--params", "params.yaml"]).output
    write(tmp_path, "teacher: {checkpoint: missing.pt}\n")
    missing = run(app, ["check", "--params", "params.yaml"])
    assert missing.exit_code == 2 and "teacher.checkpoint: missing.pt does not exist" in missing.output
