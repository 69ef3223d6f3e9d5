"""Families and datasets from the user's own modules, loaded by name.

A plug-in is an importable module that registers a family (``@provlae.models.register("name")`` on a
``Family`` subclass) or a dataset (``@provlae.data.register("name")`` on a ``DatasetSpec`` subclass):

    python -m provlae train --plugin mypkg.myfamily --set family=my_family --out out/
    python sweeps/full_grid.py --preset smoke --plugin mypkg.myfamily --families my_family

An installed package can declare its modules instead, in the entry-point groups ``provlae.families`` and
``provlae.datasets`` (``[project.entry-points."provlae.families"] my_family = "mypkg.myfamily"``): they
load wherever provlae looks names up. A module named with ``--plugin`` travels with every trial config
(the ``plugins`` field), so the Ray worker that trains the trial imports it before building it.

Every failure is one ConfigError before anything starts: a module that is not found or fails to import,
a module that registers nothing, a name that clashes with one already registered.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from pathlib import Path

from provlae.errors import ConfigError, ProvlaeError

ENTRY_POINT_GROUPS = ("provlae.families", "provlae.datasets")
_entry_points_loaded = False


def registries() -> tuple[dict, dict]:
    import provlae.data  # noqa: F401  (the built-in datasets register on import)
    from provlae.data.registry import DATASETS
    from provlae.models.families import FAMILIES

    return FAMILIES, DATASETS


def parse(text: str | None) -> list[str]:
    """'a.b, c' -> ['a.b', 'c'] (the ``plugins`` config field; repeats dropped)."""
    return list(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))


def load(modules: list[str] | str | None = None) -> list[str]:
    """Load the entry-point plug-ins and import ``modules`` (names, or a comma-separated string); the
    module names, for the ``plugins`` config field."""
    names = parse(modules) if isinstance(modules, str) or modules is None else list(dict.fromkeys(modules))
    load_entry_points()
    for name in names:
        import_plugin(name)
    return names


def import_plugin(name: str, source: str = "--plugin") -> None:
    """Import one plug-in module; it must register at least one family or dataset."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) is not None:
        return  # imported already (its registrations stand)
    families, data = registries()
    before = set(families) | {f"dataset:{n}" for n in data}
    if os.getcwd() not in sys.path and "" not in sys.path:  # a script's path starts at its own folder
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(name)
    except ProvlaeError as e:
        raise ConfigError(f"plugin {name!r} ({source}): {e}") from None
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"plugin {name!r} ({source}): no module of that name in the current folder or "
                              f"on the Python path (add its folder to PYTHONPATH, or install its package)") from None
        raise ConfigError(f"plugin {name!r} ({source}) failed to import: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any import failure of user code is one clear error
        raise ConfigError(f"plugin {name!r} ({source}) failed to import: {type(e).__name__}: {e}") from None
    after = set(families) | {f"dataset:{n}" for n in data}
    if after == before:
        sys.modules.pop(name, None)  # a second load reports it again
        raise ConfigError(f"plugin {name!r} ({source}) registers no family or dataset: decorate a Family "
                          f"subclass with @provlae.models.register(name) or a DatasetSpec subclass with "
                          f"@provlae.data.register(name)")


def load_entry_points() -> None:
    """Import the modules of the ``provlae.families`` / ``provlae.datasets`` entry points (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            try:
                import_plugin(ep.module, source=f"entry point {ep.name!r} in {group}")
            except ConfigError:
                _entry_points_loaded = False  # the next look-up reports it again
                raise


def roots(modules: list[str]) -> list[str]:
    """The folders to put on a worker's Python path so that ``modules`` (imported here) import there."""
    out = []
    for name in modules:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        folder = Path(file).resolve().parent
        depth = name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
        out.append(str(folder.parents[depth - 1] if depth else folder))
    return list(dict.fromkeys(out))


def worker_paths(modules: list[str]) -> list[str]:
    """The folders of a sweep's plug-in modules (the names in its trials' ``plugins`` field), for its
    trainable."""
    return roots(modules)


def add_paths(folders: list[str]) -> None:
    """On a Ray worker: put the driver's plug-in folders on the path (where this node has them; a cluster
    without a shared file system ships them with ``ray job submit --working-dir`` or installs them)."""
    for folder in folders:
        if folder not in sys.path and os.path.isdir(folder):
            sys.path.insert(0, folder)


def preload(argv: list[str] | None) -> list[str]:
    """The ``--plugin`` values of a command line, loaded before its parser is built (so the parser's
    choices name the plug-ins' families and datasets)."""
    args = sys.argv[1:] if argv is None else argv
    found = []
    for i, arg in enumerate(args):
        if arg == "--plugin" and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return load(",".join(found))
