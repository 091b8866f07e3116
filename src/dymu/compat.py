"""What dymu relies on in transformers' internals, checked in one place.

transformers changes its internals from one monthly release to the next (5.24 renamed the decoder
layers' KV-cache keyword from ``past_key_values`` to ``cache``, keeping the old name as a deprecated
alias). A patch that relied on a keyword name silently would run without a KV cache and generate
wrong tokens after the first one. So every patch states what it needs from the stock class it
swaps (`require_forward`, `require_attributes`) and is refused with one line naming the installed
version and the supported range when the stock class lacks it. The supported range is the one
declared in dymu's package metadata (pyproject.toml), which CI tests at both ends.
"""

from __future__ import annotations

import functools
import inspect
from importlib import metadata

# The KV-cache keyword of decoder layers: its name from transformers 5.24 on, then its name in 5.23.
CACHE_PARAMETERS = ("cache", "past_key_values")


class UnsupportedTransformersError(RuntimeError):
    """A stock transformers class is not what a dymu patch expects (another transformers version)."""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def declared_ranges() -> dict[str, str]:
    """{package: specifier} of dymu's own requirements (base and extras), e.g. {'transformers': '<5.26,>=5.23'}."""
    try:
        requires = metadata.requires("dymu") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    from packaging.requirements import Requirement  # a dependency of transformers

    ranges: dict[str, str] = {}
    for line in requires:
        req = Requirement(line)
        if req.name != "dymu" and req.name not in ranges:
            ranges[req.name] = str(req.specifier)
    return ranges


def supported(package: str) -> str:
    """'transformers>=5.23,<5.26' (the declared range), for messages."""
    spec = declared_ranges().get(package)
    if not spec:
        return f"{package} (range: see dymu's pyproject.toml)"
    return package + ",".join(sorted(spec.split(","), key=lambda s: not s.startswith(">")))


def in_range(package: str, version: str | None = None) -> bool | None:
    """Whether the installed (or given) version is inside dymu's declared range; None if unknown."""
    from packaging.specifiers import SpecifierSet

    version = version or installed_version(package)
    spec = declared_ranges().get(package)
    if version is None or spec is None:
        return None
    return SpecifierSet(spec).contains(version, prereleases=True)


def refuse(problem: str) -> UnsupportedTransformersError:
    """The one-line error for a stock class dymu does not recognise."""
    return UnsupportedTransformersError(
        f"{problem}: dymu does not recognise this transformers internal (installed transformers "
        f"{installed_version('transformers')}, dymu supports {supported('transformers')}); install a supported version"
    )


def parameters(cls: type, method: str = "forward") -> dict[str, inspect.Parameter]:
    """The parameters of ``cls.method`` as written in the stock source (decorators unwrapped)."""
    function = getattr(cls, method, None)
    if function is None:
        raise refuse(f"{cls.__name__} has no method {method}()")
    return dict(inspect.signature(inspect.unwrap(function)).parameters)


def require_forward(cls: type, names: tuple[str, ...], method: str = "forward", var_keyword: bool = True) -> None:
    """Refuse unless ``cls.method`` takes every parameter in ``names`` (and ``**kwargs`` when asked)."""
    params = parameters(cls, method)
    missing = [n for n in names if n not in params]
    if missing:
        raise refuse(f"{cls.__name__}.{method}() has no parameter {', '.join(repr(n) for n in missing)}")
    if var_keyword and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise refuse(f"{cls.__name__}.{method}() takes no **kwargs")


def require_attributes(module, names: tuple[str, ...], owner: str | None = None) -> None:
    """Refuse unless ``module`` has every (dotted) attribute in ``names``."""
    for name in names:
        obj = module
        for part in name.split("."):
            if not hasattr(obj, part):
                raise refuse(f"{owner or type(module).__name__} has no attribute {name!r}")
            obj = getattr(obj, part)


def cache_parameter(cls: type) -> str:
    """The name under which ``cls.forward`` takes the KV cache (one of CACHE_PARAMETERS), or refuse."""
    params = parameters(cls)
    for name in CACHE_PARAMETERS:
        if name in params:
            return name
    raise refuse(f"{cls.__name__}.forward() takes the KV cache under none of {', '.join(CACHE_PARAMETERS)}")


def is_cache(value) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def unwrap_compiled(module):
    """The module inside a `torch.compile` wrapper (``model.vision_tower = torch.compile(tower)``), else
    the module itself. dymu runs a tower's layers itself (DToMe changes the token count per image and
    layer), so the compiled wrapper is bypassed for the patched path: said once, not silently."""
    from torch import nn

    inner = getattr(module, "_orig_mod", None)
    if inner is None or not isinstance(module, nn.Module):
        return module
    if not _warned_compiled:
        _warned_compiled.append(True)
        import warnings

        warnings.warn(f"dymu runs the torch.compile-wrapped {type(inner).__name__} uncompiled when it merges "
                      "(token counts vary per image and layer); the stock path keeps the compiled wrapper",
                      stacklevel=3)
    return inner


_warned_compiled: list[bool] = []


def cache_layers(cache) -> list:
    """The per-layer list of a transformers `Cache` (``cache.layers``), or refuse."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise refuse(f"{type(cache).__name__} has no list of cache layers ('layers')")
    return layers
