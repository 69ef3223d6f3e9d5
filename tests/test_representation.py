"""A trial's stage-end representation (provlae/representation.py): what the trainer stores agrees with what
it logged, the same images for every seed, read back as plain arrays, a damaged or foreign file refused."""
from __future__ import annotations

import numpy as np
import pytest

from provlae import representation
from provlae.config import TrialConfig
from provlae.train import Trainer

TINY = dict(dataset="dsprites", family="pro_vlae", subset=600, steps_per_stage=6, batch_size=16, log_every=3,
            fade_in_steps=3, mi_samples=100, factor_train_votes=40, factor_eval_votes=20, eval_subset=250,
            channels=8, hidden=32, device="cpu")


@pytest.fixture(autouse=True)
def _home(provlae_home, monkeypatch):
    monkeypatch.setenv("PROVLAE_HOME", str(provlae_home))


def stored(seed: int, folder) -> tuple[Trainer, list[dict], list]:
    """Train; at every stage end keep the logged metrics and the representation written then."""
    trainer = Trainer(TrialConfig.from_dict({**TINY, "seed": seed}))
    logged, reps = [], []

    def on_event(event):
        if event.kind == "stage_end":
            logged.append(event.metrics)
            reps.append(representation.read(trainer.write_representation(folder / f"seed{seed}")))

    trainer.run(on_event)
    return trainer, logged, reps


@pytest.fixture(scope="module")
def seed0(provlae_home, tmp_path_factory):
    """Seed 0 trained once for the tests that only read what it stored: (trainer, logged, reps, folder)."""
    folder = tmp_path_factory.mktemp("representations")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PROVLAE_HOME", str(provlae_home))
        return (*stored(0, folder), folder / "seed0")


def test_each_stage_end_stores_what_it_evaluated(seed0):
    trainer, logged, reps, folder = seed0
    cfg = trainer.cfg
    assert [r.stage for r in reps] == list(range(cfg.num_stages))
    assert [r.step for r in reps] == [cfg.stage_steps * (s + 1) for s in range(cfg.num_stages)]
    assert sorted(p.name for p in folder.iterdir()) == [f"stage{s}.npz" for s in range(cfg.num_stages)]
    index = trainer.eval_index().numpy()
    for rep, metrics in zip(reps, logged):
        assert np.array_equal(rep.index, index)  # every evaluated image (fewer than MAX_POINTS)
        assert np.array_equal(rep.factors, np.asarray(trainer.data.factors)[index])
        assert rep.mu.dtype == np.float32 and rep.mu.shape == rep.logvar.shape == (len(index), len(rep.kl))
        for lid in np.unique(rep.level):  # per-latent KL adds up to the level's logged KL
            assert rep.kl[rep.level == lid].sum() == pytest.approx(metrics[f"eval_kl_z{lid}"], rel=1e-5)
    # pro-VLAE grows from the top level down: more latents in use at each stage
    assert [int(r.in_use.sum()) for r in reps] == sorted(int(r.in_use.sum()) for r in reps)
    assert reps[0].in_use.sum() < reps[-1].in_use.sum() == len(reps[-1].kl)
    assert reps[-1].codes.shape == (len(index), len(reps[-1].kl))


def test_every_seed_stores_the_same_images(seed0, tmp_path):
    first = seed0[2]
    _, _, other = stored(1, tmp_path)
    assert np.array_equal(first[-1].index, other[-1].index)
    assert not np.array_equal(first[-1].mu, other[-1].mu)  # two models, one set of inputs


def test_at_most_max_points_are_stored_and_they_do_not_depend_on_the_seed():
    rows = representation.stored_rows(3 * representation.MAX_POINTS, data_seed=0)
    assert len(rows) == representation.MAX_POINTS and len(set(rows)) == len(rows)
    assert np.array_equal(rows, representation.stored_rows(3 * representation.MAX_POINTS, data_seed=0))
    assert np.array_equal(representation.stored_rows(50, data_seed=0), np.arange(50))


def test_a_damaged_or_foreign_file_is_one_error_naming_it(seed0, tmp_path):
    good = seed0[3] / "stage2.npz"
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(representation.RepresentationError, match=f"{cut} cannot be read"):
        representation.read(cut)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, imgs=np.zeros((4, 64, 64)))
    with pytest.raises(representation.RepresentationError, match="is not a stored representation"):
        representation.read(foreign)
    pickled = tmp_path / "pickled.npz"
    arrays = dict(np.load(good))
    arrays["mu"] = np.array([object()], dtype=object)  # would need pickle to read
    np.savez(pickled, **arrays)
    with pytest.raises(representation.RepresentationError, match=str(pickled)):
        representation.read(pickled)
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, **{**dict(np.load(good)), "kl": np.zeros(2)})
    with pytest.raises(representation.RepresentationError, match="shapes do not agree"):
        representation.read(mismatched)
