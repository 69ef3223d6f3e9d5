"""A trainer's checkpoint as a file: what a version holds and how a file is read without running any code
of its own (``weights_only=True``: tensors and plain values only). ``provlae.train.Trainer`` writes and
restores its state through these."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from provlae.errors import CheckpointError
from provlae.text import first_line

CHECKPOINT_VERSION = 2  # 2: only tensors and plain values (loaded with weights_only=True); 1: numpy RNG state
READABLE_VERSIONS = (1, 2)


def read_checkpoint(path: str | Path, device) -> dict:
    """A checkpoint's state, unpickled with ``weights_only=True``: tensors and plain values only, so a file
    planted where a checkpoint is looked for cannot run code. Version 1 files also hold numpy's RNG state
    as an array (numpy's array reconstruction allowed, nothing else)."""
    import pickle
    import zipfile

    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values: refused without "
                              f"running it ({first_line(e, type(e).__name__, limit=200)})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): "
                          f"{type(e).__name__}: {str(e)[:200]}") from None


def _numpy_globals() -> list:
    """What unpickling a plain numpy array needs (numpy's own reconstruction; no code of the file's)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    found = [np.ndarray, np.dtype, multiarray._reconstruct]
    found += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return found


_NUMPY_ARRAY_GLOBALS = _numpy_globals()


def numpy_state_to_plain(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def numpy_state_from_plain(state) -> tuple:
    if isinstance(state, tuple):  # version 1
        return state
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]
