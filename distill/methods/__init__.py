"""Distillation methods, one module each; ``distill.method`` in params names one of them.

A method is a ``distill.trainer.Method`` subclass in a module of this package, registered with
``@register_method(name, Options)``. ``Options`` is a frozen dataclass of ``knob`` fields: its
defaults and ranges are the method's ``distill.<name>`` section in ``params.yaml``, validated like
every other section. Every method is built the same way::

    Method(teacher, student, options, num_classes=K, input_size=S, in_chans=C)

Adding a method is adding one file here (see docs/extending.md); nothing else lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from distill.trainer import Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str, options: type) -> Callable[[M], M]:
    """Class decorator: make ``cls`` the method ``name``, with ``options`` as its params section."""

    def add(cls: M) -> M:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"distillation method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        cls.name, cls.Options = name, options
        _REGISTRY[name] = cls
        return cls

    return add


def methods() -> dict[str, type[Method]]:
    """Every method in this package by name (each module is imported once, on the first call)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def method_options() -> dict[str, type]:
    """``{name: Options}`` for every method: the ``distill.<name>`` sections of params."""
    return {name: cls.Options for name, cls in methods().items()}


def build_method(
    name: str, teacher: Any, student: Any, options: Any = None, *, num_classes: int, input_size: int, in_chans: int
) -> Method:
    """The method ``name`` for this teacher and student (``options`` None: the defaults)."""
    known = methods()
    if name not in known:
        raise ValueError(f"unknown distillation method {name!r} (known: {', '.join(known)})")
    cls = known[name]
    return cls(
        teacher,
        student,
        cls.Options() if options is None else options,
        num_classes=num_classes,
        input_size=input_size,
        in_chans=in_chans,
    )
