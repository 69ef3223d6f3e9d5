"""Families and datasets of the user's own modules: every family (built-in and the examples') through one
smoke test; the examples through the CLI; a family in a module outside the package, the example family and
dataset, and both real file formats from a data directory through one Ray sweep into MLflow and the analysis;
bad plug-ins and data directories as one error, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from registries import isolated_registries

from provlae import data, plugins
from provlae.__main__ import main as cli_main
from provlae.config import TrialConfig
from provlae.data.files import checksum
from provlae.models import FAMILIES
from provlae.models.families import family_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = "examples.tc_vlae,examples.bars"
TINY = dict(levels=2, steps_per_stage=3, batch_size=16, fade_in_steps=2, log_every=1, mi_samples=100,
            factor_train_votes=40, factor_eval_votes=20, hidden=32, channels=8, device="cpu")


with isolated_registries():  # which names the examples add, read from the examples themselves
    plugins.load(EXAMPLES)
    EXAMPLE_FAMILIES = [n for n in family_names() if FAMILIES[n].__module__.startswith("examples.")]
    EXAMPLE_DATASETS = [n for n, s in data.DATASETS.items() if type(s).__module__.startswith("examples.")]
BUILTIN_FAMILIES = family_names()


@pytest.fixture
def examples(provlae_home, monkeypatch):
    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    with isolated_registries():
        plugins.load(EXAMPLES)
        yield


def test_examples_register_a_family_and_a_dataset():
    assert EXAMPLE_FAMILIES and EXAMPLE_DATASETS
    assert not set(EXAMPLE_FAMILIES) & set(BUILTIN_FAMILIES)
    assert "tc_vlae" not in FAMILIES  # the isolation left the registries as they were


@pytest.mark.parametrize("family", BUILTIN_FAMILIES + EXAMPLE_FAMILIES)
def test_every_family_trains_on_tiny_data(family, examples):
    """Weights change in training and not in evaluation; every stage ends; the loss terms are finite."""
    import torch

    from provlae.train import Trainer

    cfg = TrialConfig.from_dict({**TINY, "family": family, "subset": 200,
                                 "plugins": None if family in BUILTIN_FAMILIES else EXAMPLES})
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    events = []
    final = trainer.run(events.append)
    assert [e.kind for e in events].count("stage_end") == cfg.num_stages
    assert all(np.isfinite(e.metrics["loss"]) for e in events if e.kind == "step")
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    after = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(after, trainer.model.parameters()))
    assert {"mig", "mig_sup", "recon_error"} <= set(final)
    if family == "tc_vlae":  # its own term is logged with the others
        assert all("tc" in e.metrics for e in events if e.kind == "step")


def test_the_example_family_declares_its_term(examples):
    """tc_vlae: β weighs the total correlation (β - 1) and every KL weighs 1."""
    from provlae.models import build_family

    fam = build_family(TrialConfig.from_dict({"family": "tc_vlae", "beta": 4.0, "plugins": EXAMPLES}))
    assert fam.coefficients(0)["tc"] == 3.0 and fam.kl_weights(0) == [1.0] * fam.L


def test_a_variation_of_a_paper_family_is_not_in_the_paper_ordering():
    """A subclass of pro-VLAE inherits its hooks but not its paper rank: the paper's ordering, the headline
    grid and the demo stay the paper's three families while it is registered, and after it is gone."""
    from analysis.topk import paper_order
    from provlae.models import register
    from provlae.models.families import VLAE, ProVLAE
    from sweeps.grid import headline

    paper = paper_order()
    assert len(paper) == 3 and paper[0] == "pro_vlae"
    with isolated_registries():
        @register("slower_pro_vlae")
        class Slower(ProVLAE):
            pass

        @register("ranked_vlae")
        class Ranked(VLAE):
            paper_rank = 4  # declared on the class itself: ranked

        assert Slower.progressive and Slower.paper_rank is None and not headline(Slower)
        assert paper_order() == (*paper, "ranked_vlae")
    assert paper_order() == paper and ProVLAE.paper_rank == 1 and headline(ProVLAE)


def test_the_example_dataset_round_trips_its_file(examples, tmp_path):
    spec = data.DATASETS["bars"]
    path = data.generate("bars", tmp_path, factor_sizes=(2, 2, 3, 3))
    assert path.name == spec.default_filename and data.detect(path) == "bars"
    ds = data.load("bars", path)
    assert ds.factor_sizes == (2, 2, 3, 3) and len(ds) == 36
    full = data.load("bars")
    assert len(full) == spec.size
    # the file holds the full grid's rows of its kept classes (ends included)
    row = int(np.ravel_multi_index((3, 3, 7, 7), spec.factor_sizes))
    np.testing.assert_array_equal(ds.images[-1], full.images[row])


def test_cli_trains_the_example_family_on_the_example_dataset(tmp_path, provlae_home):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in {**TINY, "family": "tc_vlae", "dataset": "bars", "subset": 200}.items()]
    proc = subprocess.run([sys.executable, "-m", "provlae", "train", "--plugin", "examples.tc_vlae",
                           "--plugin", "examples.bars", *sets, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=_env(provlae_home), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["family"] == "tc_vlae" and result["config"]["dataset"] == "bars"
    assert result["config"]["plugins"] == EXAMPLES and result["data"] == {"source": "procedural"}
    assert {"mig", "mig_sup", "recon_error"} <= set(result["metrics"])
    assert (out / "figures" / "traversal.png").is_file()


def _env(home: Path) -> dict:
    import os

    return {**os.environ, "PROVLAE_HOME": str(home), "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------- bad input


def _module(folder: Path, name: str, body: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return name


BROKEN = {
    "unknown": (None, "no module of that name"),
    "raises": ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    "no_hooks": ("""
        from provlae.models import register

        @register("hookless")
        class Hookless:
            pass
        """, "is not a subclass of provlae.models.Family (it lacks level_dims"),
    "hook_not_callable": ("""
        from provlae.models import Family, register

        @register("half")
        class Half(Family):
            loss = None
        """, "missing the hook(s) loss"),
    "clash": ("""
        from provlae.models import Family, register

        @register("vlae")
        class MyVLAE(Family):
            pass
        """, "family 'vlae' of plug_clash clashes with the family of that name in provlae.models.families"),
    "dataset_clash": ("""
        from provlae.data import DatasetSpec, register

        @register("dsprites")
        class Mine(DatasetSpec):
            pass
        """, "dataset 'dsprites' of plug_dataset_clash clashes"),
    "nothing": ("X = 1\n", "registers no family or dataset"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_plugin_is_one_error_before_anything_starts(case, tmp_path, monkeypatch, capsys):
    body, message = BROKEN[case]
    name = f"plug_{case}"
    if body is not None:
        _module(tmp_path / "mods", name, body)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    from sweeps.cli import run_main
    from sweeps.full_grid import main as grid_main

    with isolated_registries():
        code = cli_main(["train", "--plugin", name, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    with isolated_registries():
        code = run_main(grid_main, ["--preset", "smoke", "--plugin", name, "--dry-run",
                                    "--storage", str(tmp_path / "ray")])
        err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ray").exists()
    assert set(FAMILIES) == set(BUILTIN_FAMILIES)


def test_a_data_directory_without_the_file_is_one_error(tmp_path, capsys, provlae_home, monkeypatch):
    from sweeps.cli import run_main
    from sweeps.full_grid import main as grid_main

    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    folder = tmp_path / "datasets"
    data.generate("dsprites", folder.mkdir() or folder, factor_sizes=(1, 2, 2, 4, 4), progress=False)
    code = run_main(grid_main, ["--preset", "smoke", "--datasets", "dsprites,shapes3d", "--data-dir",
                                str(folder), "--storage", str(tmp_path / "ray"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "dataset 'shapes3d': expected its file 3dshapes.h5 in the data directory" in err
    assert not (tmp_path / "ray").exists()
    monkeypatch.setenv("PROVLAE_DATA_DIR", str(folder))  # the environment as the flag
    code = cli_main(["train", "--set", "dataset=shapes3d", "--out", str(tmp_path / "out")])
    assert code == 2 and "expected its file 3dshapes.h5" in capsys.readouterr().err
    # a wrong file under the standard name: the loader's error names the dataset and the file
    (folder / "3dshapes.h5").write_bytes(b"not hdf5")
    code = cli_main(["train", "--set", "dataset=shapes3d", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "dataset 'shapes3d'" in err and "3dshapes.h5" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- through Ray into MLflow


MY_FAMILY = """
    '''A family of the user's own: pro-VLAE with a quadratic fade-in (alpha = (t / fade_in_steps)^2).'''
    from provlae.models import register
    from provlae.models.families import ProVLAE


    @register("slow_fade")
    class SlowFade(ProVLAE):
        display_order = 50

        def alpha(self, stage, t):
            return super().alpha(stage, t) ** 2
    """


@pytest.mark.slow
def test_own_family_and_examples_sweep_through_ray_on_their_files(local_ray, tmp_path, provlae_home, capsys,
                                                                    monkeypatch):
    """One file outside the package adds a family: it trains on the Ray workers next to the example
    family, on the example dataset and both real formats read from one data directory, each trial on its
    own file; one FINISHED run per trial with its metrics and file, and ``analysis top3`` lists them."""
    from mlflow import MlflowClient

    from sweeps.cli import run_main
    from sweeps.full_grid import main as grid_main

    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))
    module = _module(tmp_path / "user_code", "my_slow_fade", MY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path / "user_code"))
    folder = tmp_path / "datasets"
    folder.mkdir()
    with isolated_registries():
        plugins.load(EXAMPLES)
        files = {"dsprites": data.generate("dsprites", folder, factor_sizes=(2, 2, 2, 4, 4), progress=False),
                 "shapes3d": data.generate("shapes3d", folder, factor_sizes=(2, 2, 2, 2, 2, 2), progress=False),
                 "bars": data.generate("bars", folder, factor_sizes=(2, 2, 2, 2), progress=False)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with isolated_registries():
        code = run_main(grid_main, [
            "--preset", "smoke", "--plugin", module, "--plugin", "examples.tc_vlae", "--plugin", "examples.bars",
            "--families", "slow_fade,tc_vlae", "--datasets", "dsprites,shapes3d,bars", "--data-dir", str(folder),
            "--name", "plug", "--experiment", "plug", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"),
            *[f"--set={k}={v}" for k, v in {**TINY, "subset": None, "batch_size": 8}.items()]])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("plug")
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.`provlae.role` = 'trial'")]
    assert sorted((r.data.tags["family"], r.data.tags["dataset"]) for r in runs) == sorted(
        (f, d) for f in ("slow_fade", "tc_vlae") for d in files)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"mig", "mig_sup", "recon_error", "loss"} <= set(run.data.metrics)
        file = files[run.data.tags["dataset"]]
        assert run.data.params["data_path"] == str(file) == run.data.tags["data_source"]
        assert run.data.tags["data_sha256"] == checksum(file)
    assert {r.data.params["plugins"] for r in runs} == {f"{module},{EXAMPLES}"}
    proc = subprocess.run([sys.executable, "-m", "analysis", "top3", "--experiment", "plug", "--tracking-uri",
                           uri, "--k", "1"], cwd=ROOT, capture_output=True, text=True, env=_env(provlae_home),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for family in ("slow_fade", "tc_vlae"):
        assert sum(family in line.split() for line in proc.stdout.splitlines()) == len(files), proc.stdout


def test_an_installed_entry_point_loads_without_a_flag(tmp_path, monkeypatch, capsys):
    """A distribution on the path (a real importlib.metadata one: a .dist-info folder) declaring a module in
    ``provlae.families``: its family is a valid config, and a broken entry point is one clear error."""
    site = tmp_path / "site"
    _module(site, "ep_family", """
        from provlae.models import register
        from provlae.models.families import VLAE

        @register("ep_family")
        class EntryPointFamily(VLAE):
            pass
        """)
    dist = site / "provlae_ep_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: provlae-ep-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[provlae.families]\nep_family = ep_family\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    with isolated_registries():
        cfg = TrialConfig.from_dict({"family": "ep_family"})  # no --plugin: the entry point registered it
        assert cfg.plugins is None and FAMILIES["ep_family"].__module__ == "ep_family"
    (dist / "entry_points.txt").write_text("[provlae.families]\nep_family = ep_family_gone\n")
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    with isolated_registries():
        code = cli_main(["train", "--set", "family=vlae", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "plugin 'ep_family_gone' (entry point 'ep_family' in provlae.families)" in err, err
