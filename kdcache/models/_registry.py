"""Model registry, timm style: a constructor is registered under its function name."""

import fnmatch
from collections.abc import Callable

from torch import nn

from kdcache.errors import unknown_name

ModelConstructor = Callable[..., nn.Module]

_constructors: dict[str, ModelConstructor] = {}


def register_model(constructor: ModelConstructor) -> ModelConstructor:
    """Register `constructor` under its function name; returns it unchanged, so it works as a decorator."""
    name = constructor.__name__
    if name in _constructors:
        raise ValueError(f"register_model(): {name!r} is already registered")
    _constructors[name] = constructor
    return constructor


def list_models(pattern: str = "*") -> list[str]:
    """The registered names matching a shell-style pattern, sorted."""
    return sorted(name for name in _constructors if fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """A freshly initialised model of the registered architecture `name`."""
    try:
        constructor = _constructors[name]
    except KeyError:
        raise unknown_name("create_model()", name, list_models()) from None
    model = constructor(num_classes=num_classes, **kwargs)
    # Error messages (a checkpoint that does not fit) and cache metadata name the architecture.
    model.arch = name
    return model
