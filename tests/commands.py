"""A command line run in the test's own process: the same ``main`` its script or module calls, its exit
status and what it printed returned as a finished process (``subprocess.CompletedProcess``).

For the tables of bad input and the dry runs, where a new interpreter would add only its start-up (2-3 s of
imports each) and assert nothing more. Each command keeps at least one test that runs it as a real process
(the process's own exit status and stderr): the sweep scripts in tests/test_sweep_grid.py and
tests/test_sweep_inputs.py, ``python -m provlae`` in tests/test_train.py, ``python -m analysis`` in
tests/test_analysis.py.
"""
from __future__ import annotations

import importlib
import subprocess

# Each command's module, and whether its ``__main__`` block wraps ``main`` in ``sweeps.cli.run_main`` (the
# sweep scripts: `python sweeps/<name>.py`) or ``main`` reports its own errors (`python -m provlae|analysis`).
COMMANDS = {"full_grid": ("sweeps.full_grid", True), "optuna_search": ("sweeps.optuna_search", True),
            "provlae": ("provlae.__main__", False), "analysis": ("analysis.__main__", False)}


def _entry(command: str):
    module, wrapped = COMMANDS[command]
    main = importlib.import_module(module).main
    if not wrapped:
        return main
    from sweeps.cli import run_main

    return lambda argv: run_main(main, argv)


def run_command(command: str, *args: str, capsys, monkeypatch, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """Run ``command`` (a key of COMMANDS) with ``args`` here, with ``env`` set for the call (a value of
    None unsets the variable); argparse's own exits count as the exit status. torch's thread count, which
    a command's ``--threads`` sets for the whole process, is as it was afterwards."""
    import torch

    for key, value in (env or {}).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    capsys.readouterr()  # what the test printed before is not the command's
    threads = torch.get_num_threads()
    try:
        code = _entry(command)(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([command, *args], code, out, err)
