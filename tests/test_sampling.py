"""Explicit-timestep samplers: the 4-step generator's timesteps and Glance's phase schedule."""

import pytest
import torch
from torch import nn

from tsm.models import Components, Family
from tsm.objectives import DDPMObjective, FlowMatchingObjective
from tsm.sampling import glance_schedule, sample_timesteps_list, step_to


class Recorder(Family):
    """A stand-in model: records the timesteps it is called with and predicts a constant."""

    def __init__(self, value: float) -> None:
        self.calls, self.value = [], value

    def encode_prompt(self, c, captions):
        return {}

    def denoise(self, c, x, t, cond):
        self.calls.append(t.clone())
        return torch.full_like(x, self.value)

    def decode(self, c, latents):
        return latents

    def latent_shape(self, c, resolution, num_frames):
        return (1, 2, 2)


def components(family: Recorder, objective) -> Components:
    return Components(family, nn.Linear(1, 1), {}, {}, nn.Identity(), None, objective, "stand-in")


def test_four_step_generator_hits_its_timesteps():
    from diffusers import DDPMScheduler

    family = Recorder(0.0)
    c = components(family, DDPMObjective.from_scheduler(DDPMScheduler()))
    sample_timesteps_list(c, ["a", "b"], [0, 1], [999, 749, 499, 249], renoise=True)
    assert [t.tolist() for t in family.calls] == [[999, 999], [749, 749], [499, 499], [249, 249]]
    assert all(t.dtype == torch.long for t in family.calls)


def test_ddim_steps_follow_the_prediction_exactly():
    """With eps predicted as 0 the clean image is x_t / sqrt(a_t): each listed step must land on it exactly."""
    from diffusers import DDPMScheduler

    objective = DDPMObjective.from_scheduler(DDPMScheduler(clip_sample=False))
    assert objective.clip_sample is None
    c = components(Recorder(0.0), objective)
    out = sample_timesteps_list(c, ["a"], [3], [999, 500, 100])
    x = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, x / objective.alphas_cumprod[999].sqrt().float(), rtol=1e-5)


def test_x0_is_clipped_as_the_scheduler_clips_it_with_a_straight_through_gradient():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.0)
    objective = DDPMObjective.from_scheduler(sched)
    assert objective.clip_sample == 1.0
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    pred = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    t = torch.tensor([999, 400])
    x0, eps = objective.split(pred, x, t)
    a, b = (
        objective.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1),
        (1 - objective.alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1),
    )
    raw = (x - b * pred) / a
    assert raw[0].abs().max() > 100  # near t = T an epsilon model's x0 blows up ...
    assert torch.equal(x0.detach(), raw.detach().clamp(-1, 1))  # ... and is clipped, as DDIM does
    assert torch.equal(eps, pred)
    x0.sum().backward()  # straight through: d x0 / d pred = -b / a everywhere, clipped or not
    torch.testing.assert_close(pred.grad, (-b / a).expand_as(x))
    # DDIM's own step lands where the clipped x0 (and the unclipped eps) say
    sched.set_timesteps(2)
    t0, t1 = int(sched.timesteps[0]), int(sched.timesteps[1])
    want = sched.step(pred.detach(), t0, x).prev_sample
    got = step_to(objective, pred.detach(), x, torch.full((2,), t0), t1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_glance_ten_steps_cover_the_path_with_no_gap_or_overlap(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(50)
    sched = glance_schedule(ref.sigmas.tolist())
    listed = [*sched["slow"], *sched["fast"]]
    assert len(listed) == 10 and listed[0] == pytest.approx(1000.0)
    assert all(a > sched["cut"] for a in sched["slow"]) and all(b < sched["cut"] for b in sched["fast"])
    points = [*listed, sched["final"]]
    assert all(a > b for a, b in zip(points, points[1:], strict=False))  # strictly decreasing: no overlap

    # a constant velocity v moves x by (sigma_end - sigma_start) v only if the steps tile the whole path
    family = Recorder(0.5)
    c = components(family, FlowMatchingObjective(1000))
    out = sample_timesteps_list(c, ["a"], [7], listed, final=sched["final"])
    x = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    travelled = (sched["final"] - 1000.0) / 1000
    assert torch.allclose(out, x + travelled * 0.5, atol=1e-6)
    assert [float(t[0]) for t in family.calls] == pytest.approx(listed)


def test_ancestral_ddpm_sampling_is_stable_diffusion_pipelines_per_sample_generators(tmp_path):
    """With a stochastic scheduler (DDPM ancestral) each sample's step noise comes from its own seed's
    generator, as in `StableDiffusionPipeline(generator=[...])`: the same images, and a tile does not
    depend on the batch around it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from tiny_models import write_tiny_model

    from tsm.models import get_family
    from tsm.sampling import sample

    folder = write_tiny_model("sd15", tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the pipeline's (it fixes old configs)
    c = get_family("sd15").load(str(folder))
    c.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    ours = sample(c, prompts, seeds, steps=4, guidance_scale=3.0, resolution=32, progress=False)
    alone = sample(c, prompts[1:], seeds[1:], steps=4, guidance_scale=3.0, resolution=32, progress=False)

    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="pt")
    theirs = pipe(prompts, generator=gens, **kw).images
    same_start = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images

    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(alone, ours[1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(same_start, theirs)  # deterministic per seed
    steps_noise = sample(c, prompts, [3, 5], steps=4, guidance_scale=3.0, resolution=32, progress=False)
    assert (steps_noise[1] - ours[1]).abs().max() > 1e-2  # another seed, another image: the check can fail


# ---------------------------------------------------------------------------------------------------------
# prompts, steps and the progress bar
# ---------------------------------------------------------------------------------------------------------
def test_the_trigger_goes_in_front_as_the_dataset_puts_it_in_front_of_captions(tmp_path):
    from tsm.data import CaptionedImageFolder, write_digits_image_folder
    from tsm.sampling import with_trigger

    root = write_digits_image_folder(tmp_path / "images", n=3, size=8)
    plain = CaptionedImageFolder(root, resolution=8)
    triggered = CaptionedImageFolder(root, resolution=8, trigger="xyz")
    captions = [plain.caption_at(i) for i in range(len(plain))]
    assert with_trigger(captions, "xyz") == [triggered.caption_at(i) for i in range(len(plain))]
    assert with_trigger(captions, None) == captions


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", "xyz, a cat"),
        ("xyz, a cat", "xyz, a cat"),  # already there: not twice
        ("xyz a cat", "xyz a cat"),
        ("  xyz", "  xyz"),
        ("xyzzy cat", "xyz, xyzzy cat"),  # another word that starts alike
        ("", ""),  # the unconditional sample stays unconditional
    ],
)
def test_the_trigger_is_never_doubled(prompt, expected):
    from tsm.sampling import with_trigger

    assert with_trigger([prompt], "xyz") == [expected]


def test_long_values_are_shortened_for_one_line_messages():
    from tsm.errors import shorten

    long = "a " * 5000
    assert shorten(long) == long[:60] + "… (10000 characters)"
    assert shorten("a cat") == "a cat" and shorten("b" * 60) == "b" * 60


def test_fewer_than_one_step_is_an_error_not_a_division_by_zero():
    from diffusers import DDPMScheduler

    from tsm.errors import TsmError
    from tsm.sampling import sample

    c = components(Recorder(0.0), DDPMObjective.from_scheduler(DDPMScheduler()))
    for steps in (0, -3):
        with pytest.raises(TsmError, match=f"sampler steps must be at least 1, got {steps}"):
            sample(c, ["a"], [0], steps=steps)


def test_listed_timesteps_show_a_bar_with_their_count_unless_told_not_to(capsys):
    from diffusers import DDPMScheduler

    c = components(Recorder(0.0), DDPMObjective.from_scheduler(DDPMScheduler()))
    sample_timesteps_list(c, ["a", "b"], [0, 1], [999, 749, 499, 249], desc="validation grid")
    assert "validation grid (2 images, 4 steps)" in capsys.readouterr().err
    sample_timesteps_list(c, ["a", "b"], [0, 1], [999, 749, 499, 249], progress=False)
    assert capsys.readouterr().err == ""


def test_a_long_prompt_is_shortened_in_the_digits_tokenizers_error():
    from tsm.errors import TsmError
    from tsm.models.digits import tokenize

    for prompt in ["a " * 5000, "digit " * 5000]:  # an unknown word; too many words
        with pytest.raises(TsmError) as e:
            tokenize([prompt])
        assert len(str(e.value)) < 250 and f"({len(prompt)} characters)" in str(e.value)
