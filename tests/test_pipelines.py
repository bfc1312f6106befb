"""Unchanged diffusers pipelines route the experts by themselves: the denoiser's pre-hook reads each step's t."""

import pytest
import torch
from conftest import ATTN, randomize_experts, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

import tsm

PIPELINES = {
    "sd": (tiny_sd_pipeline, ATTN),  # UNet2DConditionModel, DDIM, integer t passed as a 0-d tensor
    "pixart": (tiny_pixart_pipeline, ATTN),  # PixArt transformer, DPM-Solver, integer t per sample
    "sd3": (  # MM-DiT, flow matching: float t = sigma * 1000 per sample
        tiny_sd3_pipeline,
        [*ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    ),
}


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def generate(pipe, prompt: dict, grad: bool = False) -> torch.Tensor:
    """Four steps with classifier-free guidance (the denoiser sees a batch of 2), latents out.

    ``grad=True`` runs with autograd on (the unmerged expert path); ``__call__`` is wrapped in torch.no_grad.
    """
    call = type(pipe).__call__
    with torch.set_grad_enabled(grad):
        return (call.__wrapped__ if grad else call)(
            pipe,
            **prompt,
            num_inference_steps=4,
            guidance_scale=5.0,
            height=16,
            width=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            return_dict=False,
        )[0].detach()


def record_routing(model) -> list:
    """At each denoiser call, after tsm's pre-hook: (timestep passed, main-path expert ids, merged ids)."""
    routing, calls = tsm.get_routing(model), []

    def hook(module, args, kwargs, output):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        merged = {layer.merged for _, layer in tsm.expert_layers(module)}
        calls.append((t.clone(), routing.state.main.ids.clone(), merged))

    model.register_forward_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_routes_each_step_by_its_timestep(name):
    build, targets = PIPELINES[name]
    pipe, prompt = build()
    base = generate(pipe, prompt)
    model = denoiser(pipe)
    tsm.add_experts(model, tsm.ExpertSpec(scales=(8, 1), rank=4, alpha=4, targets=targets))
    calls = record_routing(model)

    assert torch.equal(generate(pipe, prompt), base)  # zero-initialised experts: the base pipeline
    steps = pipe.scheduler.timesteps
    assert len(calls) == len(steps) == 4
    for step, (t, ids, _) in zip(steps, calls, strict=True):
        assert torch.all(t == step)  # a scalar, or one per sample
        assert ids.tolist() == [int(tsm.expert_index(step, 8, 1000))] * 2  # both halves of the CFG batch
    experts = [int(tsm.expert_index(step, 8, 1000)) for step in steps]
    assert len(set(experts)) >= 3  # the steps really cross intervals
    if name == "sd3":
        assert steps.dtype.is_floating_point and float(steps[0]) == 1000.0

    randomize_experts(model)
    assert (generate(pipe, prompt) - base).abs().max() > 1e-4


def test_pipeline_samples_with_the_core_expert_merged():
    pipe, prompt = tiny_sd_pipeline()
    model = denoiser(pipe)
    randomize_experts(tsm.add_experts(model, tsm.ExpertSpec(targets=ATTN)))
    calls = record_routing(model)
    generate(pipe, prompt)
    assert [merged for _, _, merged in calls] == [{int(ids[0])} for _, ids, _ in calls]


def test_pipeline_merged_sampling_equals_unmerged():
    """The merge-on-switch path (eval, no autograd) gives the unmerged result."""
    pipe, prompt = tiny_sd_pipeline()
    model = denoiser(pipe)
    randomize_experts(tsm.add_experts(model, tsm.ExpertSpec(targets=ATTN))).eval()
    calls = record_routing(model)
    merged = generate(pipe, prompt)
    assert [m for _, _, m in calls] == [{int(ids[0])} for _, ids, _ in calls]
    unmerged = generate(pipe, prompt, grad=True)
    assert [m for _, _, m in calls[4:]] == [{None}] * 4
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
