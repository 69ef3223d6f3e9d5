"""The family and dataset registries made temporary: what a test's plug-ins register is gone after it."""
from __future__ import annotations

import contextlib
import sys

from provlae import data
from provlae.models import FAMILIES


@contextlib.contextmanager
def isolated_registries():
    """Registrations and imports made inside are undone after: other test modules see the built-ins only."""
    families, datasets, path = dict(FAMILIES), dict(data.DATASETS), list(sys.path)
    try:
        yield
    finally:
        added = {c.__module__ for n, c in FAMILIES.items() if n not in families}
        added |= {type(s).__module__ for n, s in data.DATASETS.items() if n not in datasets}
        FAMILIES.clear(), FAMILIES.update(families)
        data.DATASETS.clear(), data.DATASETS.update(datasets)
        for name in added:  # the plug-in modules: a later load imports (and registers) them again
            sys.modules.pop(name, None)
        sys.path[:] = path
