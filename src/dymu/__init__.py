"""dymu: training-free Dynamic Merging and Virtual Unmerging (arXiv 2504.17040) for HF VLMs.

`import dymu` is cheap: the public names below load their modules (and torch, transformers) on
first use, so `dymu --help` and tools that only need the version start in a fraction of a second.
"""

from importlib import import_module

from .version import __version__

# public name -> module that defines it
_PUBLIC = {
    "apply": "dymu.api",
    "remove": "dymu.api",
    "encode": "dymu.api",
    "calibrate": "dymu.tools.calibration",
    "generate": "dymu.generation",
    "load": "dymu.generation",
    "prompt_inputs": "dymu.generation",
    "Encoded": "dymu.encoded",
    "EncodedImages": "dymu.towers.encoder",
    "Thresholds": "dymu.thresholds",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dymu' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
