"""The stage-end evaluation: which latents the information terms and the disentanglement metrics count."""
import numpy as np
import pytest
import torch

from provlae import data as datasets
from provlae.config import TrialConfig
from provlae.evaluate import disentanglement, encode
from provlae.models import LadderVAE, build_family

N = 600


@pytest.fixture(scope="module")
def data(provlae_home):
    return datasets.load("dsprites", subset=N, seed=0)


def setup(family, data, **kw):
    cfg = TrialConfig.from_dict({"family": family, "dataset": "dsprites", "z_dim": 2, **kw})
    fam = build_family(cfg)
    torch.manual_seed(0)
    model = LadderVAE(data.image_shape, fam.level_dims())
    images = torch.from_numpy(np.array(data.images))
    return cfg, fam, model, images


def evaluate(fam, model, images, data, stage):
    enc = encode(model, fam, stage, 0, images, data.pixel_scale, torch.arange(N), "cpu", seed=0)
    out = disentanglement(enc, np.asarray(data.factors), tuple(data.factor_sizes), exclude_factors=(0,),
                          mi_samples=300, train_votes=60, eval_votes=40, seed=0, device="cpu")
    return enc, out


def test_teacher_student_blocks_share_information_when_entangled(data):
    _, fam, model, images = setup("teacher_student", data)
    last = model.heads[2][-1]  # -> (mu of 6 latents, logvar of 6 latents)
    with torch.no_grad():
        last.weight[0:2] *= 20.0  # means spread far beyond the posteriors' width
        last.weight[2:6] = last.weight[0:2].repeat(2, 1)  # blocks 2 and 3 copy the teacher's block
        last.bias[2:6] = last.bias[0:2].repeat(2)
        last.weight[6:] = 0.0
        last.bias[6:] = -8.0  # sharp posteriors: each block alone pins the image down
    enc, out = evaluate(fam, model, images, data, stage=2)
    assert enc.level_ids == [1, 2, 3] and enc.levels == [[0, 1], [2, 3], [4, 5]]
    mi = [out[f"mi_z{l}"] for l in (1, 2, 3)]
    assert min(mi) > 1.0 and max(mi) - min(mi) < 0.1 * min(mi)  # three copies of one code
    # the blocks hold much the same information (three noisy views of one code): most of it is shared
    assert out["mi_over"] == pytest.approx(sum(mi) - out["mi_total"])
    assert out["mi_total"] > max(mi) and out["mi_over"] > 0.5 * sum(mi)
    assert len(enc.in_use) == 6


def test_levels_not_grown_are_encoded_at_stage_zero(data):
    _, pro, model, images = setup("pro_vlae", data)
    with torch.no_grad():
        head = model.heads[0][-1]  # z1's encoder: spread means, sharp posteriors, so z1 carries information
        head.weight[:2] *= 20.0
        head.weight[2:] = 0.0
        head.bias[2:] = -8.0
    enc, out = evaluate(pro, model, images, data, stage=0)
    assert enc.level_ids == [1, 2, 3] and enc.mu.shape[1] == 6
    assert enc.in_use == [4, 5]  # MIG and the factor score: z3, the level the model generates with
    assert {"mi_z1", "mi_z2", "mi_z3", "eval_kl_z1", "eval_kl_z2"} <= set(out)
    assert out["mi_z1"] > 1.0  # not generated with at stage 0, but encoded: it is counted
    assert out["mi_total"] > out["mi_z3"] + 0.5

    _, ts, model, images = setup("teacher_student", data)
    enc, out = evaluate(ts, model, images, data, stage=0)
    # the blocks not grown are outside the code: their prior, no information
    assert np.all(enc.mu[:, :4] == 0) and np.all(enc.logvar[:, :4] == 0)
    assert abs(out["mi_z1"]) < 1e-6 and abs(out["mi_z2"]) < 1e-6
    assert out["eval_kl_z1"] == 0.0 and enc.in_use == [4, 5]


def test_a_batch_is_contiguous_nchw_as_a_fused_groups_stacked_batch_is():
    """A permuted NHWC view would keep channels-last strides (three channels: not the NCHW layout), and a
    solo trainer's convolutions would run other kernels than a fused group's on its stacked batch."""
    import torch

    from provlae.evaluate import batches_to_float

    images = torch.randint(0, 256, (10, 8, 6, 3), dtype=torch.uint8)
    assert not images[:4].permute(0, 3, 1, 2).is_contiguous()
    x = batches_to_float(images, torch.tensor([3, 0, 7]), 1 / 255, "cpu")
    assert x.shape == (3, 3, 8, 6) and x.is_contiguous() and x.dtype == torch.float32
    assert torch.allclose(x, images[[3, 0, 7]].permute(0, 3, 1, 2).float() / 255)
    assert torch.stack([x, x]).is_contiguous()
