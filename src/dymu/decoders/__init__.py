"""Language-model decoder layers with VTU, one file per family of decoder layers.

Importing this package registers every family with the shared VTU layer (vtu_layer.py, patched in by llama.py).
"""

from . import qwen_vl  # noqa: F401  (registers the Qwen VL text decoders)
from . import qwen3_5  # noqa: F401  (registers the Qwen3.5 hybrid decoder)
from . import gemma3  # noqa: F401  (registers the Gemma 3 text decoder)
from . import qwen3  # noqa: F401  (registers the Qwen3 decoder: InternVL 3.5)
