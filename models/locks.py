"""One lock per loaded network, shared by prediction and Grad-CAM (its own module: the refer policy and the engine
both need it, and neither may import the other)."""
from __future__ import annotations

import threading
import weakref

import torch

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of a model shared between sessions. Prediction and Grad-CAM both take it: Grad-CAM's hooks on a
    layer record whatever passes through it, so a prediction running beside a heatmap would hand the heatmap its
    activations (re-entrant: a heatmap may predict inside)."""
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = threading.RLock()
        return _LOCKS[model]
