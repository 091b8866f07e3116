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
