"""dymu: training-free Dynamic Merging and Virtual Unmerging (arXiv 2504.17040) for HF VLMs."""

__version__ = "0.1.0"

from .api import apply, encode, remove  # noqa: E402
from .patch.encoder import EncodedImages  # noqa: E402

__all__ = ["apply", "remove", "encode", "EncodedImages", "__version__"]
from .calibrate import calibrate  # noqa: E402
from .thresholds import Thresholds  # noqa: E402

__all__ += ["calibrate", "Thresholds"]
from .generate import generate  # noqa: E402

__all__ += ["generate"]
