"""Objectives against diffusers' training scripts: timestep densities, truncated draws, weights, noise."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)
from scipy.stats import ks_2samp

from tsm.errors import TsmError
from tsm.intervals import expert_index, interval_bounds, sample_timesteps
from tsm.objectives import DDPMObjective, FlowMatchingObjective

N = 10_000
T = 1000


def script_u(weighting, batch, seed, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    g = torch.Generator().manual_seed(seed)
    return compute_density_for_timestep_sampling(
        weighting_scheme=weighting,
        batch_size=batch,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=g,
    )


def script_t(scheduler, weighting, batch, seed, logit_mean=0.0):
    """train_dreambooth_lora_sd3.py: indices = (u * T).long(); timesteps = scheduler.timesteps[indices]."""
    u = script_u(weighting, batch, seed, logit_mean)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices]


def ddpm_script_t(weighting, batch, seed, logit_mean=0.0):
    """The DDPM reading of the same density: noise level s = 1 - u, t = clamp(floor(s T), 0, T - 1)."""
    return torch.floor((1 - script_u(weighting, batch, seed, logit_mean)) * T).long().clamp(0, T - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


CASES = [("logit_normal", 0.0), ("none", 0.0), ("logit_normal", 0.5), ("mode", 0.0)]


def _expected_table_mean(table, weighting):
    """E[table[(u T).long()]] computed from the density of u, independently of the sampler."""
    if weighting == "none":
        return float(table.double().mean())
    cdf = [0.5 * (1 + math.erf(math.log(x / (1 - x)) / math.sqrt(2))) if 0 < x < 1 else x for x in
           [i / T for i in range(T + 1)]]  # fmt: skip
    return sum(float(table[i]) * (cdf[i + 1] - cdf[i]) for i in range(T))


@pytest.mark.parametrize("weighting,logit_mean", CASES)
def test_untruncated_flow_draws_follow_the_sd3_script(weighting, logit_mean):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = FlowMatchingObjective.from_scheduler(sched, weighting=weighting, logit_mean=logit_mean)
    ours, ref = obj.sample_t(N, gen(1)), script_t(sched, weighting, N, 2, logit_mean)
    assert ours.dtype == torch.float32 and ours.shape == (N,)
    p = ks_2samp(ours.numpy(), ref.numpy()).pvalue
    assert p > 1e-3, p
    if logit_mean == 0.0 and weighting in ("none", "logit_normal"):
        want = _expected_table_mean(sched.timesteps, weighting)  # 713.7 logit_normal, 676.6+0.x none
        assert abs(want - {"logit_normal": 714, "none": 680}[weighting]) < 5
        se = float(ref.std()) / math.sqrt(N)
        assert abs(float(ours.mean()) - want) < 4 * se and abs(float(ref.mean()) - want) < 4 * se


@pytest.mark.parametrize("weighting", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_same_generator_gives_the_scripts_timesteps_exactly(weighting):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for logit_mean in (0.0, 0.5):
        obj = FlowMatchingObjective.from_scheduler(sched, weighting=weighting, logit_mean=logit_mean)
        assert torch.equal(obj.sample_t(256, gen(7)), script_t(sched, weighting, 256, 7, logit_mean))
    if weighting in ("logit_normal", "mode"):
        ddpm = DDPMObjective.from_scheduler(DDPMScheduler(), weighting=weighting, logit_mean=0.5)
        assert torch.equal(ddpm.sample_t(256, gen(7)), ddpm_script_t(weighting, 256, 7, 0.5))


def test_uniform_ddpm_draws_are_unchanged():
    obj = DDPMObjective.from_scheduler(DDPMScheduler())
    assert torch.equal(obj.sample_t(64, gen(3)), torch.randint(0, T, (64,), generator=gen(3)))
    got = obj.sample_t(64, gen(3), expert=(4, 2))
    assert torch.equal(got, sample_timesteps(2, 4, 64, T, generator=gen(3)))


def _mixture(obj, ref, scale, n):
    """Truncated draws, as many per interval as the reference sample has there; checks they stay inside."""
    counts = torch.bincount(expert_index(ref, scale, T), minlength=n)
    parts = []
    for i in range(n):
        t = obj.sample_t(int(counts[i]), gen(100 + i), expert=(scale, i))
        assert (expert_index(t, scale, T) == i).all(), (i, t.min(), t.max(), interval_bounds(i, scale, T))
        parts.append(t)
    return torch.cat(parts)


@pytest.mark.parametrize("weighting,logit_mean", CASES)
def test_truncated_flow_draws_mix_back_to_the_density(weighting, logit_mean):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = FlowMatchingObjective.from_scheduler(sched, weighting=weighting, logit_mean=logit_mean)
    mix = _mixture(obj, script_t(sched, weighting, N, 1, logit_mean), 4, 4)
    assert mix.dtype == torch.float32
    p = ks_2samp(mix.numpy(), script_t(sched, weighting, N, 2, logit_mean).numpy()).pvalue
    assert p > 1e-3, p


@pytest.mark.parametrize("weighting", ["logit_normal", "mode"])
def test_truncated_flow_draws_stay_inside_awkward_intervals(weighting):
    obj = FlowMatchingObjective(T, weighting, 0.5, 1.0, 3.0)
    for scale in (7, [333.3, 875.1, 999.99]):
        n = 7 if scale == 7 else 4
        for i in range(n):
            t = obj.sample_t(2000, gen(i), expert=(scale, i))
            assert (expert_index(t, scale, T) == i).all()
    # narrower than a few float32 ulps (3e-5 at 500): rounding t to float32 would leave it without the clamp
    t = obj.sample_t(2000, gen(0), expert=([500.00001, 500.00005], 1))
    assert (expert_index(t, [500.00001, 500.00005], T) == 1).all()
    with pytest.raises(TsmError, match="no float32 timestep"):
        obj.sample_t(4, gen(0), expert=([500.00001, 500.00002], 1))


def test_truncated_ddpm_draws_mix_back_to_the_density():
    obj = DDPMObjective.from_scheduler(DDPMScheduler(), weighting="logit_normal", logit_mean=0.5)
    mix = _mixture(obj, ddpm_script_t("logit_normal", N, 1, 0.5), 4, 4)
    assert mix.dtype == torch.long
    p = ks_2samp(mix.numpy(), ddpm_script_t("logit_normal", N, 2, 0.5).numpy()).pvalue
    assert p > 1e-3, p
    assert abs(float(mix.float().mean()) - float(obj.sample_t(N, gen(3)).float().mean())) < 10


def test_tables_and_shift():
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)  # Flux-like
    obj = FlowMatchingObjective.from_scheduler(dynamic)
    plain = FlowMatchEulerDiscreteScheduler().timesteps
    assert obj.shift == 1.0 and torch.equal(obj.timesteps, plain)
    assert abs(float(obj.sample_t(N, gen(0)).mean()) - 500.5) < 8  # shifted by 3 it would be ~714
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(FlowMatchingObjective.from_scheduler(dynamic, shift=3.0).timesteps, shifted.timesteps)
    shifted.set_timesteps(4)  # an inference table must not leak into training
    obj3 = FlowMatchingObjective.from_scheduler(shifted)
    assert obj3.shift == 3.0 and torch.equal(
        obj3.timesteps, FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps
    )
    assert torch.equal(FlowMatchingObjective(1000).timesteps, plain)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_script(prediction_type):
    sched = DDPMScheduler(prediction_type=prediction_type)
    obj = DDPMObjective.from_scheduler(sched, min_snr_gamma=5.0)
    timesteps = torch.cat([torch.randint(0, T, (60,), generator=gen(0)), torch.tensor([0, 999, 20, 21])])
    # train_text_to_image_lora.py
    snr = compute_snr(sched, timesteps)
    mse_loss_weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    else:
        mse_loss_weights = mse_loss_weights / (snr + 1)
    assert torch.allclose(obj.snr_weights(timesteps), mse_loss_weights, rtol=1e-6, atol=1e-6)
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clip
    x0, noise, pred = (torch.randn(64, 4, 8, 8, generator=gen(s)) for s in (1, 2, 3))
    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, timesteps)
    mse = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    assert torch.allclose(obj.loss(pred, x0, noise, timesteps), mse * mse_loss_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighting", ["cosmap", "sigma_sqrt"])
def test_sd3_loss_weighting_matches_the_script(weighting):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = FlowMatchingObjective.from_scheduler(sched, weighting=weighting)
    bsz = 32
    x0, noise, pred = (torch.randn(bsz, 4, 8, 8, generator=gen(s)) for s in (1, 2, 3))
    # train_dreambooth_lora_sd3.py
    u = script_u(weighting, bsz, 5)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    sigmas = sched.sigmas[indices].reshape(bsz, 1, 1, 1)  # get_sigmas
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    target = noise - x0
    weighting_ = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
    ref = torch.mean((weighting_.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)

    t = obj.sample_t(bsz, gen(5))
    assert torch.equal(t, timesteps)
    assert torch.allclose(obj.noisy(x0, noise, t), noisy, atol=1e-6)
    got = obj.loss(pred, x0, noise, t)
    assert torch.allclose(got, ref, rtol=1e-5)
    assert not torch.allclose(got, ((pred - target) ** 2).flatten(1).mean(1), rtol=1e-2)


@pytest.mark.parametrize("make", [lambda o: DDPMObjective.from_scheduler(DDPMScheduler(), noise_offset=o),
                                  lambda o: FlowMatchingObjective(1000, noise_offset=o)])  # fmt: skip
def test_draw_noise(make):
    for shape in [(4, 3, 5), (4, 2, 3, 5)]:
        plain = torch.stack([torch.randn(shape, generator=gen(s)) for s in range(3)])
        assert torch.equal(make(0.0).draw_noise(shape, [gen(s) for s in range(3)]), plain)
        got = make(0.1).draw_noise(shape, [gen(s) for s in range(3)])
        diff = got - plain
        ones = (1,) * (len(shape) - 1)
        for s in range(3):
            g = gen(s)
            torch.randn(shape, generator=g)
            second = torch.randn((shape[0], *ones), generator=g)  # drawn after the sample's main noise
            assert torch.allclose(diff[s], (0.1 * second).expand(shape), atol=1e-6)
        assert (diff - diff[:, :, :1, :1]).abs().max() < 1e-6 and diff.abs().max() > 1e-3


def test_bad_settings_raise():
    with pytest.raises(TsmError, match="none, logit_normal, mode, cosmap, sigma_sqrt"):
        FlowMatchingObjective(1000, "logitnormal")
    with pytest.raises(TsmError, match="none, logit_normal, mode, cosmap, sigma_sqrt"):
        DDPMObjective.from_scheduler(DDPMScheduler(), weighting="uniform")
    with pytest.raises(TsmError, match="DDPM models take none, logit_normal, mode"):
        DDPMObjective.from_scheduler(DDPMScheduler(), weighting="cosmap")
    with pytest.raises(TsmError, match="min_snr_gamma applies to epsilon/v-prediction models"):
        FlowMatchingObjective.from_scheduler(FlowMatchEulerDiscreteScheduler(), min_snr_gamma=5.0)
    with pytest.raises(TsmError, match="min_snr_gamma applies to epsilon/v-prediction models"):
        FlowMatchingObjective(1000, min_snr_gamma=5.0)
    with pytest.raises(TsmError, match="mode_scale"):
        FlowMatchingObjective(1000, "mode", mode_scale=2.0)
    with pytest.raises(TsmError, match="use DDPMObjective"):
        FlowMatchingObjective.from_scheduler(DDPMScheduler())
