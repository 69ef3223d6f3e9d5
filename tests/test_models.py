"""The ladder network and the four families: structure, stage schedule, loss terms, training vs eval."""
import pickle

import pytest
import torch

from provlae.config import TrialConfig
from provlae.models import FAMILIES, LadderVAE, build_family
from provlae.models.families import bernoulli_nll, cross_covariance, gaussian_kl

ALL = ["beta_vae", "vlae", "pro_vlae", "teacher_student"]


def make(family, **kw):
    cfg = TrialConfig.from_dict({"family": family, "fade_in_steps": 100, "gamma": 0.5, "beta": 4.0, **kw})
    fam = build_family(cfg)
    torch.manual_seed(0)
    model = LadderVAE((1, 64, 64), fam.level_dims())
    return cfg, fam, model


def batch(n=8, c=1, size=64):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, c, size, size, generator=g) > 0.7).float()


def test_registry_has_the_four_families():
    assert set(ALL) <= set(FAMILIES)


@pytest.mark.parametrize("family", ALL)
def test_same_number_of_latents_and_steps(family):
    cfg, fam, model = make(family)
    assert sum(fam.level_dims()) == cfg.levels * cfg.z_dim
    assert cfg.stage_steps * fam.num_stages == cfg.levels * cfg.steps_per_stage


@pytest.mark.parametrize("family", ALL)
def test_weights_change_in_training_not_in_eval(family):
    cfg, fam, model = make(family)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = batch()
    stage = fam.num_stages - 1
    fam.begin_stage(model, stage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x, fam.gates(stage, 50, "cpu"))
        fam.loss(model, x, stage, 50)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    out = fam.loss(model, x, stage, 50)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("trunk") for k in changed) and any(k.startswith("heads") for k in changed)
    assert any(k.startswith("out_conv") for k in changed)


@pytest.mark.parametrize("family", ALL)
def test_model_and_family_pickle(family):
    cfg, fam, model = make(family)
    fam.begin_stage(model, fam.num_stages - 1)
    x = batch(2)
    gates = fam.gates(0, 0, "cpu")
    clone = pickle.loads(pickle.dumps(model))
    fam2 = pickle.loads(pickle.dumps(fam))
    assert fam2.level_dims() == fam.level_dims()
    assert torch.equal(model(x, gates, sample=False).logits, clone(x, gates, sample=False).logits)


def test_pro_vlae_grows_top_down_with_fade_in():
    cfg, fam, _ = make("pro_vlae")
    assert [fam.active_levels(s) for s in range(3)] == [[2], [1, 2], [0, 1, 2]]
    assert fam.alpha(0, 0) == 1.0  # the first stage is a plain VAE at the deepest level
    assert fam.alpha(1, 0) == 0.0 and fam.alpha(1, 50) == 0.5 and fam.alpha(1, 100) == 1.0
    assert fam.alpha(2, 1000) == 1.0
    g = fam.gates(1, 25, "cpu")
    assert g.dec == [0.0, 0.25, 1.0] and g.enc == [1.0, 0.25, 1.0]
    assert fam.kl_weights(0) == [0.5, 0.5, 4.0]  # gamma on levels not grown yet, beta on the rest
    assert fam.kl_weights(2) == [4.0, 4.0, 4.0]


def test_pro_vlae_loss_is_eq_11():
    """recon + beta * KL(active) + gamma * KL(inactive), with the terms the loss reports."""
    cfg, fam, model = make("pro_vlae")
    torch.manual_seed(3)
    out = fam.loss(model, batch(), 0, 0)
    t = out.terms
    expected = t["recon"] + 4.0 * t["kl_z3"] + 0.5 * (t["kl_z1"] + t["kl_z2"])
    assert torch.allclose(out.loss, expected)
    cfg0, fam0, model0 = make("pro_vlae", gamma=0.0)
    torch.manual_seed(3)
    out0 = fam0.loss(model0, batch(), 0, 0)
    assert torch.allclose(out0.loss, t["recon"] + 4.0 * t["kl_z3"])


def test_levels_not_grown_do_not_reach_the_decoder():
    cfg, fam, model = make("pro_vlae")
    x = batch(4)
    g0 = fam.gates(0, 0, "cpu")
    ref = model(x, g0, sample=False).logits
    with torch.no_grad():  # scramble the lower heads: stage 0 output must not move
        for l in (0, 1):
            for p in model.heads[l].parameters():
                p.add_(torch.randn_like(p))
    assert torch.equal(ref, model(x, g0, sample=False).logits)
    g1 = fam.gates(1, 0, "cpu")  # alpha = 0: the new level is there but faded out
    assert torch.allclose(ref, model(x, g1, sample=False).logits)
    g1_late = fam.gates(1, 100, "cpu")
    assert not torch.allclose(ref, model(x, g1_late, sample=False).logits)


def test_beta_vae_and_vlae_losses():
    for family in ("beta_vae", "vlae"):
        cfg, fam, model = make(family)
        torch.manual_seed(5)
        out = fam.loss(model, batch(), 0, 0)
        torch.manual_seed(5)
        o = model(batch(), fam.gates(0, 0, "cpu"))
        kl = sum(gaussian_kl(m, lv) for m, lv in zip(o.mu, o.logvar) if m is not None)
        assert torch.allclose(out.loss, bernoulli_nll(o.logits, batch()).mean() + 4.0 * kl)
    assert make("beta_vae")[1].level_dims() == [0, 0, 6]


def test_teacher_student_grows_the_code_and_supervises_with_a_frozen_teacher():
    cfg, fam, model = make("teacher_student")
    assert [int(fam.gates(s, 0, "cpu").dim_mask[2].sum()) for s in range(3)] == [2, 4, 6]
    x = batch()
    out0 = fam.loss(model, x, 0, 0)
    assert not any(k.startswith("ts_") for k in out0.terms)
    fam.begin_stage(model, 1)
    assert all(not p.requires_grad for p in fam.teacher.parameters())
    out1 = fam.loss(model, x, 1, 0)
    # student == teacher at the start of the stage: the inherited code matches exactly
    assert out1.terms["ts_y"].item() == pytest.approx(0.0, abs=1e-10)
    assert {"ts_y", "ts_xcov", "ts_jac"} <= set(out1.terms)
    teacher_before = {k: v.clone() for k, v in fam.teacher.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        out = fam.loss(model, x, 1, 0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert fam.loss(model, x, 1, 0).terms["ts_y"].item() > 0  # the student moved, the teacher did not
    assert all(torch.equal(teacher_before[k], v) for k, v in fam.teacher.state_dict().items())


def test_mnist_sized_ladder():
    cfg, fam, _ = make("vlae")
    model = LadderVAE((1, 32, 32), fam.level_dims())
    out = model(batch(2, 1, 32), fam.gates(0, 0, "cpu"))
    assert out.logits.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        LadderVAE((1, 28, 28), fam.level_dims())


def test_cross_covariance_is_the_frobenius_norm_of_centred_codes_over_b():
    z = torch.tensor([[1.0], [3.0]])  # centred: [-1, 1]
    y = torch.tensor([[2.0, 0.0], [0.0, 4.0]])  # centred: [[1, -2], [-1, 2]]
    # Z^T Y = [-1*1 + 1*-1, -1*-2 + 1*2] = [-2, 4]; ||.||_F = sqrt(20); / B = 2
    assert cross_covariance(z, y).item() == pytest.approx(20 ** 0.5 / 2)


def test_teacher_student_constraints_weigh_as_against_a_summed_elbo():
    cfg, fam, model = make("teacher_student", lambda_xcov=0.5, lambda_y=2.0)
    x = batch(n=8)
    fam.begin_stage(model, 1)
    out = fam.loss(model, x, 1, 0, noise=fam.draw_noise(model, 1, 8, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        mu = model.encode(x, fam.gates(1, 0, "cpu"))[0][2].double().numpy()
    k = cfg.z_dim
    zc, yc = mu[:, k:2 * k] - mu[:, k:2 * k].mean(0), mu[:, :k] - mu[:, :k].mean(0)
    by_hand = ((zc.T @ yc) ** 2).sum() ** 0.5 / 8  # ||Z^T Y||_F / B
    # the port's loss is sum_b ELBO_b + constraints; here it is divided by B
    assert out.terms["ts_xcov"].item() == pytest.approx(0.5 * by_hand / 8, rel=1e-5)
    assert out.terms["ts_y"].item() == pytest.approx(0.0, abs=1e-10)  # the student starts as its teacher


def test_teacher_student_blocks_are_levels_grown_in_pro_vlae_order():
    _, fam, _ = make("teacher_student", z_dim=2)
    # the teacher's block (stage 0) is z3, the block grown at stage s is z_{3-s}
    assert fam.information_levels() == [(1, 2, [4, 5]), (2, 2, [2, 3]), (3, 2, [0, 1])]
    _, pro, _ = make("pro_vlae", z_dim=2)
    assert pro.information_levels() == [(1, 0, [0, 1]), (2, 1, [0, 1]), (3, 2, [0, 1])]
    _, bvae, _ = make("beta_vae", z_dim=2)
    assert bvae.information_levels() == [(3, 2, list(range(6)))]
