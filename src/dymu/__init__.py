"""dymu: training-free Dynamic Merging and Virtual Unmerging (arXiv 2504.17040) for HF VLMs."""

__version__ = "0.1.0"

# Imported eagerly on purpose: `dymu.calibrate` and `dymu.generate` are also submodule names, and
# binding the functions here after the submodules load keeps `dymu.calibrate(...)` the function.
from .api import apply, encode, remove  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .generate import generate  # noqa: E402
from .patch.encoder import EncodedImages  # noqa: E402
from .thresholds import Thresholds  # noqa: E402

__all__ = ["apply", "remove", "encode", "calibrate", "generate", "EncodedImages", "Thresholds", "__version__"]
