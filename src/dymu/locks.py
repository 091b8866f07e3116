"""One lock per model for the public calls that run a patched model (`dymu.encode`, `dymu.generate`,
`dymu.prompt_inputs`).

The patched layers keep the state of the running forward on the model (merge sizes, group maps, the
last encoded batch), so two calls at once on one model would read each other's state and return
silently wrong results. The lock is re-entrant (a call may use another under it) and kept outside
the model, weakly, so the model stays deep-copyable and picklable.
"""

from __future__ import annotations

import threading
import weakref

_MODEL_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock
