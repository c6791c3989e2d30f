"""Typed, frozen configuration mirroring ``params.yaml``: one dataclass per section.

``load_section(path, "crawl", CrawlConfig)`` reads one section and validates it against the
dataclass: an unknown key (a typo), a missing required key, a wrong type or an out-of-range value
raises ``ConfigError`` naming the file and the dotted key; the CLI turns that into exit code 2.
Ranges live beside each field as ``field(metadata=...)``, so the schema is the documentation.
Only ``pipeline/`` imports this module.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from crawl.settings import AnalyzeParams, DecodeLimits, FilterParams, HttpLimits, ImageFormat
from demo.settings import RenderParams, WorldMix
from distill.settings import Augment, Runtime, Schedule, TeacherSpec
from kd3util import knob, same_as

MAX_PARAMS_BYTES = 1_000_000  # a params file larger than this is refused before parsing

T = TypeVar("T")


class ConfigError(ValueError):
    """A params file or CLI override that cannot be used; the message names file and key."""


# --------------------------------------------------------------------------------------------
# world: the offline demo web corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """``world:`` — builds ``out_dir`` from Fashion-MNIST train[first:last]."""

    source: str = "/usr/share/datasets/fashion-mnist"  # folder with the *-idx*-ubyte(.gz) files
    classes: str = "classes.txt"  # class names in Fashion-MNIST label order
    out_dir: str = "data/world"
    seed: int = knob(0, 0)
    first: int = knob(30000, 0, 60000)  # raw web material: train[first:last], never seen by the teacher
    last: int = knob(60000, 1, 60000)
    results_per_class: int = knob(400, 1, 100000)  # length of each class's search result list
    broken_kinds: list[str] = knob(["http_404", "html_as_image", "truncated"])
    mix: WorldMix = field(default_factory=WorldMix)  # fractions of each result list, summing to 1
    render: RenderParams = field(default_factory=RenderParams)  # how an item becomes a web-style photo


# --------------------------------------------------------------------------------------------
# crawl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpConfig:
    """``crawl.http``: the downloader's limits (``crawl.download.HttpLimits``) and its thread count."""

    workers: int = knob(8, 1, 256)  # download threads
    per_host_concurrency: int = same_as(HttpLimits, "per_host_concurrency")
    per_host_delay_s: float = same_as(HttpLimits, "per_host_delay_s")
    connect_timeout_s: float = same_as(HttpLimits, "connect_timeout_s")
    read_timeout_s: float = same_as(HttpLimits, "read_timeout_s")
    deadline_s: float = same_as(HttpLimits, "deadline_s")
    max_bytes: int = same_as(HttpLimits, "max_bytes")
    max_redirects: int = same_as(HttpLimits, "max_redirects")
    retries: int = same_as(HttpLimits, "retries")
    backoff_s: float = same_as(HttpLimits, "backoff_s")
    max_retry_after_s: float = same_as(HttpLimits, "max_retry_after_s")
    user_agent: str = same_as(HttpLimits, "user_agent")
    allow_private: bool = same_as(HttpLimits, "allow_private")
    host_failures: int = same_as(HttpLimits, "host_failures")
    robots_timeout_s: float = same_as(HttpLimits, "robots_timeout_s")


@dataclass(frozen=True)
class MirrorConfig:
    """The offline web server the ``mirror`` engine starts in-process."""

    world_dir: str = "data/world"
    host: str = "127.0.0.1"
    port: int = knob(47611, 0, 65535)  # fixed, so URLs (and so resume) are stable across runs; 0 = any free port


@dataclass(frozen=True)
class CrawlConfig:
    """``crawl:`` — class names -> search queries -> engines -> downloaded, content-addressed images."""

    classes: str = "classes.txt"
    out_dir: str = "data/crawl"
    engines: list[str] = knob(["mirror"])  # registered engines (crawl/sources.py): bing, baidu, google, ...
    queries: list[str] = knob(["{name}", "{name} photo"])  # templates; {name} is the class name or a synonym
    synonyms: str | None = None  # optional TSV: class name <TAB> synonym (one per line)
    per_class: int = knob(300, 1, 100000)  # target number of downloaded images per class
    oversample: float = knob(1.5, 1, 20)  # candidate URLs asked of each engine and query = per_class * oversample
    min_per_class: int = knob(1, 0, 100000)  # fewer downloaded images than this for a class is an error
    shard: str = "0/1"  # i/n: crawl only classes with index % n == i
    urls_file: str | None = "urls.tsv"  # TSV class <TAB> url, for engine "urls" (a dvc.yaml dependency)
    greedy_domains: list[str] = knob([])  # start pages for engine "greedy"
    greedy_max_pages: int = knob(50, 1, 100000)
    bing_base_url: str = "https://www.bing.com"
    flickr_api_key_env: str = "FLICKR_API_KEY"  # the key is read from this environment variable
    progress: bool = True
    robots: bool = same_as(HttpLimits, "robots")  # honour each site's robots.txt; false for sources you own
    class_budget_s: float | None = knob(None, 0, lo_open=True)  # download time per class and run; null = no limit
    http: HttpConfig = field(default_factory=HttpConfig)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)


# --------------------------------------------------------------------------------------------
# clean
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanConfig:
    """``clean:`` — crawl store -> safe decode, filters, dedup -> packed array + kept/dropped lists."""

    crawl_dir: str = "data/crawl"
    out_dir: str = "data/clean"
    image_size: int | None = knob(None, 8, 1024)  # side of the packed array, pixels; null: the teacher's input
    # size times CROP_MARGIN (see resolve_image_size); smaller than the teacher's input size is an error
    resize: Literal["crop", "pad"] = same_as(AnalyzeParams, "resize")
    formats: tuple[ImageFormat, ...] = same_as(DecodeLimits, "formats")
    max_bytes: int = same_as(DecodeLimits, "max_bytes")
    max_pixels: int = same_as(DecodeLimits, "max_pixels")
    max_frames: int = same_as(DecodeLimits, "max_frames")
    min_side: int = same_as(FilterParams, "min_side")
    max_aspect: float = same_as(FilterParams, "max_aspect")
    min_std: float = same_as(FilterParams, "min_std")
    min_entropy: float = same_as(FilterParams, "min_entropy")
    hash_size: int = same_as(AnalyzeParams, "hash_size")
    hamming: int = knob(6, 0, 1024)  # candidate near-duplicates: pHash distance <= this (<= 7: fast at 1e6)
    verify_mad: float | None = knob(6.0, 0, 255)  # ... confirmed when 16x16 thumbnails differ <= this; null: off
    uniform_std: float = knob(2.0, 0, 128)  # flatter images are never matched perceptually
    workers: int = knob(0, 0, 256)  # decode/hash processes; 0 = every core
    decode_timeout_s: float = knob(10.0, 0.1, 600)  # per image; a hung decoder costs that image
    worker_memory_mb: int = knob(2048, 64, 1_000_000)  # address-space limit of each worker
    sheet_max: int = knob(48, 0, 1000)  # images per contact sheet
    progress: bool = True


# --------------------------------------------------------------------------------------------
# teacher, label, evaluate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTeacherConfig:
    """How the demo teacher is trained when ``teacher.checkpoint`` is null (Fashion-MNIST only)."""

    source: str = "/usr/share/datasets/fashion-mnist"
    first: int = knob(0, 0, 60000)  # the teacher's private data: train[first:last]
    last: int = knob(30000, 1, 60000)
    epochs: int = knob(5, 1, 1000)
    batch_size: int = knob(128, 1, 65536)
    lr: float = knob(0.1, 0, 10, lo_open=True)
    weight_decay: float = knob(5e-4, 0, 1)
    seed: int = knob(0, 0)


@dataclass(frozen=True)
class TeacherConfig:
    """``teacher:`` — the user's checkpoint (or the demo teacher) and how to feed it."""

    checkpoint: str | None = None  # your file; null trains the demo teacher on Fashion-MNIST
    format: Literal["state_dict", "torchscript"] = same_as(TeacherSpec, "format")
    arch: str = "resnet8"  # registry or torchvision name (state_dict only)
    classes: str = "classes.txt"  # one name per line, in the teacher's output order
    input_size: int = knob(32, 8, 1024)  # the teacher's input side, pixels
    in_chans: int = same_as(TeacherSpec, "in_chans")
    feature_layer: str | None = same_as(TeacherSpec, "feature_layer")
    classifier_layer: str | None = same_as(TeacherSpec, "classifier_layer")
    mean: list[float] = knob([0.286, 0.286, 0.286])  # per channel, on [0, 1] inputs
    std: list[float] = knob([0.353, 0.353, 0.353], 0, 10, lo_open=True)
    max_bytes: int = same_as(TeacherSpec, "max_bytes")
    memory_limit_mb: int = same_as(TeacherSpec, "memory_limit_mb")
    out_dir: str = "data/teacher"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    demo: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)


@dataclass(frozen=True)
class LabelConfig:
    """``label:`` — teacher pseudo-labels for every clean image."""

    clean_dir: str = "data/clean"
    teacher_dir: str = "data/teacher"
    out_dir: str = "data/label"
    batch_size: int = knob(512, 1, 65536)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    truth: str | None = None  # demo only: the world's truth.jsonl, for the report (training never reads it)
    strict: bool = False  # fail (exit 1) when the transfer diagnostics warn, instead of going on


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate:`` — accuracy on a labelled set of the original distribution."""

    teacher_dir: str = "data/teacher"
    eval_dir: str | None = None  # an image folder with one sub-folder per class name
    fashion_mnist: str | None = None  # demo: Fashion-MNIST folder; its test split is the eval set
    first: int = knob(0, 0)  # evaluate eval items [first:last] (the demo keeps 2000 for validation)
    last: int | None = None
    batch_size: int = knob(512, 1, 65536)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "metrics"
    student_dir: str | None = None  # the distill stage's out_dir: score the exported student too (null: teacher only)


@dataclass(frozen=True)
class ReportConfig:
    """``report:`` — the run's HTML page; it finds the other stages' outputs through their sections."""

    out_dir: str = "data/report"
    title: str | None = None  # the page's heading (null: "kd3 run: <the project folder's name>")


@dataclass(frozen=True)
class DistillEval:
    """The per-epoch validation curve (never the reported test split)."""

    eval_dir: str | None = None  # a labelled image folder by class name
    fashion_mnist: str | None = None  # demo: Fashion-MNIST test[first:last]
    first: int = knob(0, 0)
    last: int | None = knob(2000, 1)


@dataclass(frozen=True)
class DistillConfig:
    """``distill:`` — the student, the method (kd3, kd, dfnd), the schedule and the runtime."""

    clean_dir: str = "data/clean"
    label_dir: str = "data/label"
    teacher_dir: str = "data/teacher"
    out_dir: str = "data/distill"
    metrics_dir: str = "metrics"
    method: str = "kd3"  # a method of distill/methods/: kd3, or the baselines kd and dfnd
    student: str = "resnet8"  # registry or torchvision name
    epochs: int = same_as(Schedule, "epochs")
    batch_size: int = same_as(Schedule, "batch_size")
    lr: float = same_as(Schedule, "lr")
    momentum: float = same_as(Schedule, "momentum")
    weight_decay: float = same_as(Schedule, "weight_decay")
    lr_schedule: Literal["step", "cosine"] = same_as(Schedule, "lr_schedule")
    milestones: tuple[float, ...] = same_as(Schedule, "milestones")
    warmup_epochs: int = same_as(Schedule, "warmup_epochs")
    epoch_size: Literal["selected", "pool"] = same_as(Schedule, "epoch_size")
    ema_decay: float = same_as(Schedule, "ema_decay")
    crop_scale: tuple[float, float] = same_as(Augment, "crop_scale")
    crop_ratio: tuple[float, float] = same_as(Augment, "crop_ratio")
    flip: bool = same_as(Augment, "flip")
    grayscale: float = same_as(Augment, "grayscale")
    holdout: float = knob(0.05, 0, 0.5)  # web images never trained on (teacher-student agreement)
    seed: int = knob(0, 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = same_as(Runtime, "amp")
    channels_last: bool = same_as(Runtime, "channels_last")
    compile: bool = same_as(Runtime, "compile")
    nan_policy: Literal["abort", "skip"] = same_as(Runtime, "nan_policy")
    gpu_memory_budget_mb: int | None = knob(None, 0)  # the pool's share of the GPU; null: half its free memory
    truth: str | None = None  # demo only: the world's truth, for selection precision (never trained on)
    eval: DistillEval = field(default_factory=DistillEval)
    # one section per method (distill.kd3, distill.kd, ...), each the method's own Options dataclass
    methods: dict[str, Any] = field(default_factory=dict, metadata={"sections": "distill.methods:method_options"})

    @property
    def options(self) -> Any:
        """The chosen method's options (``distill.<method>``)."""
        return self.methods[self.method]


# --------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------


MAX_PARAMS_DEPTH = 32  # nesting deeper than this is refused (params nest three levels)


class _ParamsLoader(yaml.SafeLoader):
    """The safe loader, stricter: no anchors/aliases, no duplicate or non-string keys, bounded depth.

    PyYAML silently keeps the last of two equal keys and recurses once per nesting level; a params
    file needs neither, so each is an error with its line.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases are not allowed")
        self.depth += 1
        try:
            if self.depth > MAX_PARAMS_DEPTH:
                raise ConfigError(f"line {event.start_mark.line + 1}: nested more than {MAX_PARAMS_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"line {line}: key {key!r} is not a name (write it as a string, or fix the indent)")
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first set on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params file with a size cap and the strict safe loader (``_ParamsLoader``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found")
    if p.stat().st_size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{p}: params file larger than {MAX_PARAMS_BYTES} bytes, refused")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_ParamsLoader)  # noqa: S506 (safe subclass)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def load_section(path: str | Path, section: str, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from ``params[section]`` plus dotted ``overrides`` (CLI flags), validated."""
    return _section(read_params(path), path, section, cls, overrides)


def _section(
    data: dict[str, Any], path: str | Path, section: str, cls: type[T], overrides: dict[str, Any] | None = None
) -> T:
    """``load_section`` on an already-read params mapping."""
    raw = data.get(section, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section}: expected a mapping, got {type(raw).__name__}")
    raw = _apply_overrides(raw, overrides or {})
    return build(cls, raw, f"{path}: {section}")


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[leaf] = value
    return out


def build(cls: type[T], raw: Any, where: str) -> T:
    """Validate a mapping against a frozen dataclass; errors name ``where.key``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    # a field with "sections" metadata collects several sub-sections, each its own dataclass
    sections = {name: _sections(f.metadata["sections"]) for name, f in fields.items() if "sections" in f.metadata}
    valid = {name for name in fields if name not in sections} | {k for s in sections.values() for k in s}
    unknown = sorted(set(raw) - valid, key=str)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(valid))})")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in sections:
            kwargs[name] = {k: build(tp, raw.get(k) or {}, f"{where}.{k}") for k, tp in sections[name].items()}
            continue
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key missing")
            continue
        value = _coerce(hints[name], raw[name], key)
        _check_range(value, f.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def _registry(name: str) -> Any:
    """``"module:attribute"``, imported when first needed: a registry of engines or methods.

    Named, not imported at the top, so that only the section that uses a registry loads it (the
    distill methods import torch; ``kd3 crawl`` should not), and each stage's ``dvc.yaml`` deps
    list the registry only where the stage's own code imports it.
    """
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _sections(provider: str) -> dict[str, type]:
    """The ``{section name: dataclass}`` a ``"module:function"`` registry returns."""
    return _registry(provider)()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # YAML reads 1e9 as a string and 3.0 as a float; accept only whole numbers
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a schema bug, not a user error


def _check_range(value: Any, meta: Any, key: str) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if lo is None and hi is None:
        return
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and v > hi
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"{key}: {v!r} is out of range, allowed {allowed}")


# --------------------------------------------------------------------------------------------
# cross-field checks
# --------------------------------------------------------------------------------------------


def _world_validate(self: WorldConfig, where: str) -> None:
    if self.last <= self.first:
        raise ConfigError(f"{where}.last: must be greater than first ({self.first}), got {self.last}")
    m = self.mix
    total = m.correct + m.wrong + m.junk + m.near_dup + m.broken
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{where}.mix: fractions must sum to 1, got {total:.4f}")
    r = self.render
    if r.light_bg_prob + r.dark_bg_prob > 1:
        raise ConfigError(f"{where}.render: light_bg_prob + dark_bg_prob must be at most 1")
    if r.min_size > r.max_size:
        raise ConfigError(f"{where}.render.min_size: {r.min_size} is larger than max_size {r.max_size}")
    if len(r.object_scale) != 2 or not 0 < r.object_scale[0] <= r.object_scale[1] <= 1.5:
        raise ConfigError(f"{where}.render.object_scale: expected [lo, hi] with 0 < lo <= hi <= 1.5")
    if len(r.jpeg_quality) != 2 or not 1 <= r.jpeg_quality[0] <= r.jpeg_quality[1] <= 100:
        raise ConfigError(f"{where}.render.jpeg_quality: expected [lo, hi] with 1 <= lo <= hi <= 100")
    allowed = {"JPEG", "PNG", "WEBP"}
    if not r.formats or set(r.formats) - allowed or any(v < 0 for v in r.formats.values()):
        raise ConfigError(f"{where}.render.formats: expected weights >= 0 for some of {sorted(allowed)}")
    kinds = {"http_404", "html_as_image", "truncated"}
    bad = [k for k in self.broken_kinds if k not in kinds]
    if bad or (m.broken > 0 and not self.broken_kinds):
        raise ConfigError(f"{where}.broken_kinds: expected a non-empty subset of {sorted(kinds)}")


def parse_shard(text: str, where: str = "shard") -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ConfigError(f"{where}: expected 'i/n' such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"{where}: expected 0 <= i < n, got {text!r}")
    return i, n


def _crawl_validate(self: CrawlConfig, where: str) -> None:
    if not self.engines:
        raise ConfigError(f"{where}.engines: at least one engine is needed")
    engines = _registry("crawl.sources:SOURCES")  # the crawl stage imports it anyway; others need not
    unknown = [e for e in self.engines if e not in engines]
    if unknown:
        raise ConfigError(f"{where}.engines: {unknown[0]!r} is not one of {', '.join(sorted(engines))}")
    if len(set(self.engines)) != len(self.engines):
        raise ConfigError(f"{where}.engines: an engine is listed twice")
    if not self.queries:
        raise ConfigError(f"{where}.queries: at least one query template is needed")
    for q in self.queries:
        if "{name}" not in q:
            raise ConfigError(f"{where}.queries: template {q!r} has no {{name}} placeholder")
        try:
            q.format(name="x")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"{where}.queries: template {q!r} may only use {{name}}") from None
    if self.min_per_class > self.per_class:
        raise ConfigError(f"{where}.min_per_class: {self.min_per_class} exceeds per_class {self.per_class}")
    parse_shard(self.shard, f"{where}.shard")
    if "urls" in self.engines and not self.urls_file:
        raise ConfigError(f"{where}.urls_file: required when engine 'urls' is selected")
    if "greedy" in self.engines and not self.greedy_domains:
        raise ConfigError(f"{where}.greedy_domains: required when engine 'greedy' is selected")


CROP_MARGIN = 1.5  # packed side / teacher input side: a training crop of >= 44% of the area is not upsampled


def resolve_image_size(clean: CleanConfig, teacher_input_size: int, where: str = "clean.image_size") -> int:
    """The packed array's side: ``clean.image_size``, or the teacher's input size plus the crops' margin.

    A side below the teacher's input would upsample every image the teacher and student see.
    """
    if clean.image_size is None:
        return int(round(teacher_input_size * CROP_MARGIN))
    if clean.image_size < teacher_input_size:
        raise ConfigError(
            f"{where}: {clean.image_size} is smaller than teacher.input_size {teacher_input_size}, so "
            "every image would be upsampled; use null (the teacher's size plus the crops' margin) "
            "or a value >= the teacher's input size"
        )
    return clean.image_size


def _clean_validate(self: CleanConfig, where: str) -> None:
    if (self.hash_size * self.hash_size) % 64:
        raise ConfigError(f"{where}.hash_size: {self.hash_size} gives {self.hash_size**2} bits; use 8, 16, 24 or 32")
    if self.hamming > self.hash_size * self.hash_size:
        raise ConfigError(f"{where}.hamming: {self.hamming} exceeds the {self.hash_size**2} bits of the hash")
    if not self.formats:
        raise ConfigError(f"{where}.formats: at least one format is needed")


WorldConfig.validate = _world_validate  # type: ignore[attr-defined]
CrawlConfig.validate = _crawl_validate  # type: ignore[attr-defined]
CleanConfig.validate = _clean_validate  # type: ignore[attr-defined]


def _teacher_validate(self: TeacherConfig, where: str) -> None:
    if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
        raise ConfigError(
            f"{where}.mean/std: need {self.in_chans} values each (in_chans), got {len(self.mean)}/{len(self.std)}"
        )
    if self.demo.last <= self.demo.first:
        raise ConfigError(f"{where}.demo.last: must be greater than first ({self.demo.first})")


def _evaluate_validate(self: EvaluateConfig, where: str) -> None:
    if self.last is not None and self.last <= self.first:
        raise ConfigError(f"{where}.last: must be greater than first ({self.first})")


TeacherConfig.validate = _teacher_validate  # type: ignore[attr-defined]
EvaluateConfig.validate = _evaluate_validate  # type: ignore[attr-defined]


def _distill_validate(self: DistillConfig, where: str) -> None:
    for name in ("crop_scale", "crop_ratio"):
        lo, hi = getattr(self, name)
        if lo > hi:
            raise ConfigError(f"{where}.{name}: need [min, max] with min <= max, got {[lo, hi]}")
    if self.eval.last is not None and self.eval.last <= self.eval.first:
        raise ConfigError(f"{where}.eval.last: must be greater than first ({self.eval.first})")
    if self.warmup_epochs >= self.epochs:
        raise ConfigError(f"{where}.warmup_epochs: must be less than epochs ({self.epochs})")
    if self.method not in self.methods:
        raise ConfigError(f"{where}.method: {self.method!r} is not one of {', '.join(self.methods)}")


DistillConfig.validate = _distill_validate  # type: ignore[attr-defined]


SECTIONS: dict[str, type] = {
    "world": WorldConfig,
    "crawl": CrawlConfig,
    "clean": CleanConfig,
    "teacher": TeacherConfig,
    "label": LabelConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}


def check_params(path: str | Path) -> list[str]:
    """Validate every section of a params file and the input files it names; return notes for the user.

    The same checks each stage makes when it starts, all at once, so a typo in ``distill`` is found
    before a long crawl rather than after it. Raises ``ConfigError`` on the first problem.
    """
    data = read_params(path)
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown section (valid: {', '.join(SECTIONS)})")
    cfg: dict[str, Any] = {name: _section(data, path, name, cls) for name, cls in SECTIONS.items()}
    crawl, teacher = cfg["crawl"], cfg["teacher"]
    size = resolve_image_size(cfg["clean"], teacher.input_size, f"{path}: clean.image_size")
    inputs = {"crawl.classes": crawl.classes, "teacher.classes": teacher.classes}
    if "urls" in crawl.engines:
        inputs["crawl.urls_file"] = crawl.urls_file
    if teacher.checkpoint:
        inputs["teacher.checkpoint"] = teacher.checkpoint
    for key, file in inputs.items():
        if file and not Path(file).is_file():
            raise ConfigError(f"{path}: {key}: {file} does not exist")
    teacher_note = teacher.checkpoint or "the demo teacher (checkpoint: null)"
    return [
        f"{len(SECTIONS)} sections valid",
        f"crawl: engines {', '.join(crawl.engines)}, classes from {crawl.classes}",
        f"teacher: {teacher_note}, {teacher.arch}, input {teacher.input_size} px; clean packs {size} px",
        f"distill: {cfg['distill'].method}, student {cfg['distill'].student}, {cfg['distill'].epochs} epochs",
    ]
