"""What the project asks of PyTorch: a floor, not a pin, so a GPU machine's own CUDA build of PyTorch is kept
(`pip install -e .` there changes nothing), and the floor is one this code runs on."""
from __future__ import annotations

from pathlib import Path

import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def torch_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return req


def test_torch_is_a_floor_that_the_installed_torch_meets():
    req = torch_requirement()
    (spec,) = req.specifier
    assert spec.operator == ">=", f"torch should be a floor, not {spec}"
    installed = Version(torch.__version__.split("+")[0])
    assert installed in req.specifier
    # Where a GPU machine's build stands (2.11 with CUDA, say): above the floor, so it is kept.
    assert Version("2.11") in req.specifier


def test_the_floor_has_what_the_code_uses():
    """The floor is the first PyTorch with everything below: checkpoints unpickled with an allow-list
    (``weights_only`` and ``safe_globals``, 2.5), fused groups' ``torch.func``, compiled steps."""
    floor = Version(next(iter(torch_requirement().specifier)).version)
    assert floor == Version("2.5")
    assert callable(torch.serialization.safe_globals) and callable(torch.func.functional_call)
    assert callable(torch.func.vmap) and callable(torch.compile)
