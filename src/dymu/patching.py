"""Classes for per-instance patches (a stock layer's class swapped for a subclass), made on the fly
from a mixin and the stock class, that still pickle.

Pickle (and `torch.save(model)`) stores an object's class by module and name, so a class made with
`type()` and kept in a dict cannot be found again. Each made class is named ``PREFIX + stock name``
in the module that makes it, and that module's ``__getattr__`` (PEP 562) calls `resolve`, which
rebuilds the class from the stock classes the module knows, in a fresh process too.
"""

from __future__ import annotations

from typing import Callable, Iterable


class PatchedClasses:
    """``patched(stock)`` -> the class ``type(PREFIX + stock.__name__, (mixin, stock), attrs(stock))``,
    made once, living in ``module`` for pickle; ``patched.resolve(name)`` finds it by name."""

    def __init__(self, module: str, prefix: str, mixin: type, stocks: Callable[[], Iterable[type]],
                 attrs: Callable[[type], dict] = lambda stock: {}):
        self.module, self.prefix, self.mixin, self.stocks, self.attrs = module, prefix, mixin, stocks, attrs
        self._made: dict[type, type] = {}

    def __call__(self, stock: type) -> type:
        if stock not in self._made:
            name = self.prefix + stock.__name__
            self._made[stock] = type(name, (self.mixin, stock),
                                     {"__module__": self.module, "__qualname__": name, **self.attrs(stock)})
        return self._made[stock]

    def resolve(self, name: str) -> type:
        for stock in self.stocks():
            if self.prefix + stock.__name__ == name:
                return self(stock)
        raise AttributeError(f"module {self.module!r} has no attribute {name!r}")


# A VLM family's patch of its inner model (families/): the class swapped for a patched subclass and the
# family's settings object beside it, both in the instance's own __dict__, so `restore_class` finds
# and removes exactly what `swap_class` added.
_SWAP_ATTRIBUTES = ("_dymu_stock_class", "_dymu", "_dymu_running")


def swap_class(module, patched: type, state) -> None:
    """``module`` becomes an instance of ``patched`` (a subclass of its stock class) holding ``state`` as
    ``module._dymu`` (what the patched forward reads); `restore_class` undoes it."""
    module._dymu = state
    module._dymu_stock_class = type(module)
    module.__class__ = patched


def restore_class(module) -> None:
    """The stock class again, and none of the attributes `swap_class` (or a forward) added."""
    if "_dymu_stock_class" in module.__dict__:
        module.__class__ = module._dymu_stock_class
    for name in _SWAP_ATTRIBUTES:
        module.__dict__.pop(name, None)


# The one record of a patched model itself (the object `dymu.apply` was given): the settings it was
# applied with. Everything a family's patched forward needs lives on the module it swapped (``_dymu``
# above); the model's mode, `dymu.api.settings_of` and `dymu.api.applied` all read this record.
_SETTINGS_ATTRIBUTE = "_dymu_settings"


def record_settings(model, settings) -> None:
    model.__dict__[_SETTINGS_ATTRIBUTE] = settings


def recorded_settings(model):
    """The settings ``model`` was patched with (None: stock, or never patched by `dymu.apply`)."""
    return model.__dict__.get(_SETTINGS_ATTRIBUTE)


def forget_settings(model) -> None:
    model.__dict__.pop(_SETTINGS_ATTRIBUTE, None)
