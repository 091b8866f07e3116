"""Vision towers: the shared DToMe mechanism (encoder.py) and one small adapter per family, registered in
registry.py.

Importing this package registers every family, so `find_towers` / `family_of` / `family_for_model_type`
see them all.
"""

from . import clip, siglip  # noqa: F401  (each registers its family)
