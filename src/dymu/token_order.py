"""Where the tokens that survive a DToMe merge go: the merge-order setting (torch-free, for the CLI).

The next layer splits the live tokens into A (even slots) and B (odd slots) again, so the layout
after a merge decides which tokens can be paired at the next layer, and so how many merge.
- ``interleaved``: survivors keep their relative order (A and B stay interleaved).
- ``ab``: [A survivors by slot, B by slot]: the paper's code at inference on CLIP (with a class
  token) and its batched path, which its threshold calibration runs.
- ``ab-score``: [A survivors by descending best score (stable), B by slot]: the paper's batch-1
  inference path on towers without a class token (SigLIP).
In every order the class token (if any) stays first, and the layout depends on the image alone.
"""

ORDERS = ("interleaved", "ab", "ab-score")

# The paper's calibration lays tokens out as `ab`, and so does its CLIP inference: thresholds we
# calibrate in that order mean what the paper's calibration meant (README, "Fidelity").
DEFAULT_ORDER = "ab"


def check_order(order: str, where: str = "order") -> str:
    if order not in ORDERS:
        raise ValueError(f"{where} {order!r} is not a merge order; choose one of {', '.join(ORDERS)}")
    return order
