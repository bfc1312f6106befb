"""Glance phase experts on the digits model (a toy-pretrained base): schedule, training, assembling, sampling."""

import pytest
import torch

import tsm
from tsm.bench.digits_data import load_digit_split, make_source_batch
from tsm.bench.digits_model import pretrain_base
from tsm.intervals import expert_index
from tsm.models.digits import DigitsFamily
from tsm.recipes.glance import glance_spec, glance_timesteps, train_glance
from tsm.sampling import sample_timesteps_list


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrain_base(tmp_path_factory.mktemp("glance") / "base", steps=2, batch=8, progress=False)


def pairs(n: int):
    images, labels = load_digit_split("train")
    return make_source_batch(images, labels, n, torch.Generator().manual_seed(5))


def test_schedule_on_a_ddpm_model(base):
    c = DigitsFamily().load(str(base))
    ts = glance_timesteps(c)
    c.scheduler.set_timesteps(50)
    ref = c.scheduler.timesteps.tolist()
    assert ts["slow"] == [ref[k - 1] for k in (1, 3, 5, 7, 9)]
    assert ts["fast"] == [ref[k - 1] for k in (11, 21, 31, 41, 50)]
    assert min(ts["slow"]) > ts["cut"] > max(ts["fast"]) and ts["final"] is None


def test_phase_experts_train_on_their_own_timesteps_then_assemble(base):
    c = DigitsFamily().load(str(base))
    ts = glance_timesteps(c)
    spec = glance_spec(ts["cut"], rank=2, targets=["to_q", "to_k", "to_v", "to_out.0"], context=True)
    tsm.add_experts(c.denoiser, spec)
    x0, prompts = pairs(1)  # one image-caption pair, as in the paper
    losses = train_glance(c, x0, prompts, ts, steps=3, warmup=2)
    assert len(losses) == 3 and all(v == v for v in losses)
    layer = c.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    trained = {k for k, b in layer.lora_B.items() if b.abs().sum() > 0}
    assert trained == {"s0_i0", "s0_i1", "s1_i0"}  # fast, slow, and the full-range context expert

    # every listed timestep routes to its phase's expert
    for phase, want in (("slow", 1), ("fast", 0)):
        for t in ts[phase]:
            assert int(expert_index(torch.tensor(t), (ts["cut"],))) == want

    experts = {k: v.detach().clone() for k, v in layer.lora_B.items()}
    table = layer.router.table.detach().clone()
    train_glance(c, x0, prompts, ts, steps=2, warmup=1, stage="assemble")
    assert all(torch.equal(layer.lora_B[k], v) for k, v in experts.items())  # experts frozen
    assert not torch.equal(layer.router.table, table)  # the router trained
    rows = (layer.router.table - table).abs().sum(1).nonzero().squeeze(1).tolist()
    assert set(rows) <= set(ts["slow"] + ts["fast"])  # only on the listed timesteps

    images = sample_timesteps_list(
        c, ["digit 3", "digit 7"], [0, 1], ts["slow"] + ts["fast"], ts["final"], guidance_scale=2.0
    )
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1
