"""The MLflow record's contract (analysis.record): params read back as the config holds them, the trial key,
which run of a trial is the record. Pure Python: no server."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from analysis.errors import AnalysisError
from analysis.record import cast_param, default_mode, trial_key, unique_trials
from provlae.config import FIELD_TYPES, TrialConfig
from provlae.text import first_line, last_line

# A value of every field type, none at its default: str, int, float, bool, and the optional ones set and unset
CHANGED = TrialConfig(family="beta_vae", beta=4.0, seed=3, lr=1e-3, gamma=0.0, tf32=True, include_shape=True,
                      subset=100, data_path="/data/dsprites.npz", eval_subset=None, plugins="mypkg.fam",
                      lambda_xcov=1e-05, steps_per_stage=1000, dtype="bfloat16")


@pytest.mark.parametrize("cfg", [TrialConfig(), CHANGED], ids=["defaults", "changed"])
def test_every_param_reads_back_as_the_config_holds_it(cfg):
    """A sweep logs each field as str(value) (sweeps.tracking); read back, it is the same value and type."""
    for name in FIELD_TYPES:
        value = getattr(cfg, name)
        back = cast_param("run", name, str(value))
        assert back == value and type(back) is type(value), (name, value, back)


def test_every_field_type_is_covered():
    kinds = {FIELD_TYPES[f.name] for f in dataclasses.fields(TrialConfig)}
    assert kinds == {"str", "int", "float", "bool", "int | None", "str | None"}


def test_param_reading_follows_the_config_rule():
    """The strings the config accepts (CLI, files) read back the same: one rule for both."""
    from_cli = TrialConfig.from_dict({"steps_per_stage": "1e3"})
    assert cast_param("run", "steps_per_stage", "1e3") == 1000 == from_cli.steps_per_stage
    assert cast_param("run", "tf32", "yes") is True is TrialConfig.from_dict({"tf32": "yes"}).tf32
    assert cast_param("run", "subset", "null") is None
    with pytest.raises(AnalysisError, match=r"run r1: param seed='1\.5' is not a valid int"):
        cast_param("r1", "seed", "1.5")
    with pytest.raises(AnalysisError, match="is not a valid float"):
        cast_param("r1", "beta", "abc")


def test_params_that_are_no_config_field_are_guessed():
    assert cast_param("run", "trials", "12") == 12
    assert cast_param("run", "ratio", "0.5") == 0.5
    assert cast_param("run", "fuse", "True") is True
    assert cast_param("run", "preset", "demo") == "demo"
    assert cast_param("run", "overrides", "None") is None


def test_the_trial_key_is_the_sweep_and_the_config_identity():
    """The keys existing stores hold (computed by earlier versions) name the same trials."""
    assert trial_key("demo", TrialConfig()) == "8de14f0f8893f12c17a4ba69"
    assert trial_key("demo", TrialConfig(beta=4.0, dtype="bfloat16", subset=100)) == "19194303a44b35425435ada1"
    assert trial_key("other", TrialConfig()) != trial_key("demo", TrialConfig())


def _run(run_id, status="FINISHED", metrics=True, start=0, key=None, sweep="s", name="n"):
    tags = {"sweep": sweep, **({"provlae.trial_key": key} if key else {})}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, start_time=start, run_name=name),
                           data=SimpleNamespace(tags=tags, metrics={"mig": 1.0} if metrics else {}, params={}))


def test_one_record_per_trial():
    failed, done = _run("a", "FAILED", key="k"), _run("b", key="k", start=5)
    ghost = _run("c", "RUNNING", metrics=False, key="k")
    old_early, old_late = _run("d", start=1), _run("e", start=2)
    other = _run("f", key="k2")
    kept = unique_trials([failed, done, ghost, old_late, old_early, other])
    assert [r.info.run_id for r in kept] == ["b", "d", "f"]


def test_default_mode():
    assert default_mode("recon_error") == "min" and default_mode("mig_sup") == "max"


def test_message_lines():
    text = "\n  Traceback (most recent call last):\n  File x\nValueError: bad\n\n"
    assert first_line(text) == "Traceback (most recent call last):"
    assert last_line(text) == "ValueError: bad"
    assert first_line("", "none here") == last_line(None, "none here") == "none here"
    assert len(last_line("x" * 500)) == 300 and len(first_line("x" * 500, limit=200)) == 200
