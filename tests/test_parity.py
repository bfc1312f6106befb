"""tsm's training forward against the lines of diffusers' own LoRA training scripts.

For SD1.5 (examples/text_to_image/train_text_to_image_lora.py), SD3
(examples/dreambooth/train_dreambooth_lora_sd3.py) and Flux (examples/dreambooth/train_dreambooth_lora_flux.py)
the same latents, noise, timesteps and prompt embeddings go through (a) `DiffusionLoss` on a model built by
`tsm.recipes.run.build` (method lora: one expert over all t, denoiser experts only, random non-zero lora_B) and
(b) the script's training-step lines, reproduced here and calling the very same model object. The batch-mean
losses and the gradients on every LoRA parameter must agree. The scripts themselves cannot run here (they
import torchvision and datasets); their lines are copied from the diffusers repository's examples.

The timestep densities are checked too, through the config: tsm's `objective.sample_t` draws against the
scripts' ``compute_density_for_timestep_sampling`` -> ``(u * T).long()`` -> ``noise_scheduler_copy.timesteps``
(a two-sample KS test), on SD3's shift-3 table and on Flux's unshifted one (use_dynamic_shifting).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_experts
from tiny_models import write_tiny_model

import tsm
from tsm.config import load_config
from tsm.models import pack_latents
from tsm.recipes.base import DiffusionLoss
from tsm.recipes.run import build, load_components

B = 4
RESOLUTION = 16  # 8x8 latents for the three tiny VAEs (x2)
CAPTIONS = ["a cat", "a red dog on a mat", "", "two birds"]
T = 1000


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {name: str(write_tiny_model(name, root / name)) for name in ("sd15", "sd3", "flux")}


def components(folders, family: str, *overrides: str):
    """The model `tsm train` trains with method lora: one expert over all t on the denoiser, none on text."""
    cfg = load_config(
        None,
        [
            f"model.family={family}",
            f"model.path={folders[family]}",
            "train.method=lora",
            "experts.scales=[1]",
            "experts.text_targets=[]",
            *overrides,
        ],
    )
    c = build(cfg, torch.device("cpu"), torch.float32)
    assert all(getattr(m, "tsm_routing", None) is None for m in c.text_encoders.values())
    randomize_experts(c.denoiser, std=0.05)  # B = 0 would make A's gradients vanish
    c.denoiser.train()  # as the loop (and the scripts) train
    return c


def inputs(c, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (B, *c.family.latent_shape(c, RESOLUTION, 1))
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def loss_and_grads(c, forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = tsm.adapter_params(c.denoiser)
    assert params
    for p in params:
        p.grad = None
    loss = forward()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def assert_same(name: str, ours, theirs, rtol: float = 1e-5) -> tuple[float, float]:
    """Same loss and same gradients (to ``rtol`` of their scale); prints the max absolute differences."""
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    d_loss = (loss - ref_loss).abs().item()
    d_grad = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True))
    scale = max(g.abs().max().item() for g in ref_grads)
    nonzero = sum(bool(g.abs().sum() > 0) for g in ref_grads)
    print(
        f"\n[parity] {name}: loss {ref_loss.item():.6f}, |d loss| {d_loss:.3g}; "
        f"{len(ref_grads)} LoRA tensors ({nonzero} with non-zero grad), max |grad| {scale:.3g}, "
        f"max |d grad| {d_grad:.3g}"
    )
    assert scale > 0 and nonzero == len(ref_grads)  # the comparison is not of zeros
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)
    return d_loss, d_grad


def script_sigmas(noise_scheduler_copy, timesteps: torch.Tensor, n_dim: int = 4) -> torch.Tensor:
    """The SD3 / Flux scripts' ``get_sigmas``."""
    sigmas = noise_scheduler_copy.sigmas.to(dtype=torch.float32)
    schedule_timesteps = noise_scheduler_copy.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def script_timesteps(noise_scheduler_copy, weighting: str, batch: int, generator: torch.Generator):
    """The SD3 / Flux scripts' draw (logit_mean 0, logit_std 1, mode_scale 1.29: their defaults)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting,
        batch_size=batch,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=generator,
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    return noise_scheduler_copy.timesteps[indices]


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction_type,snr_gamma", [(None, None), (None, 5.0), ("v_prediction", 5.0)], ids=str
)
def test_sd15_step_is_train_text_to_image_lora(folders, prediction_type, snr_gamma):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    overrides = []
    if snr_gamma is not None:
        overrides.append(f"objective.min_snr_gamma={snr_gamma}")
    if prediction_type is not None:
        overrides.append(f"model.prediction_type={prediction_type}")
    c = components(folders, "sd15", *overrides)
    unet = c.denoiser
    noise_scheduler = DDPMScheduler.from_pretrained(folders["sd15"], subfolder="scheduler")
    latents, noise = inputs(c)
    g = torch.Generator().manual_seed(1)
    # tsm draws t as the script does
    assert torch.equal(
        c.objective.sample_t(B, torch.Generator().manual_seed(1)),
        torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=g),
    )
    # t = 3 has SNR > gamma, t = 999 SNR < gamma: both branches of min-SNR
    timesteps = torch.cat([torch.tensor([3, 999]), torch.randint(0, T, (B - 2,), generator=g)]).long()
    with torch.no_grad():
        encoder_hidden_states = c.family.encode_prompt(c, CAPTIONS)["encoder_hidden_states"]

    def script() -> torch.Tensor:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=prediction_type)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        if snr_gamma is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        snr = compute_snr(noise_scheduler, timesteps)
        assert (snr > snr_gamma).any() and (snr < snr_gamma).any()
        mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            mse_loss_weights = mse_loss_weights / snr
        elif noise_scheduler.config.prediction_type == "v_prediction":
            mse_loss_weights = mse_loss_weights / (snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
        return loss.mean()

    ours = loss_and_grads(c, lambda: DiffusionLoss(c)(latents, noise, timesteps, CAPTIONS).mean())
    theirs = loss_and_grads(c, script)
    assert_same(f"sd15 prediction_type={prediction_type} snr_gamma={snr_gamma}", ours, theirs)


@pytest.mark.parametrize("weighting", ["logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_sd3_step_is_train_dreambooth_lora_sd3(folders, weighting):
    """``--weighting_scheme <weighting>`` with the script's default ``--precondition_outputs 1`` (tsm's sd3
    default) and with ``--precondition_outputs 0`` (``objective.precondition_outputs=false``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    c = components(folders, "sd3", f"objective.weighting={weighting}")
    transformer = c.denoiser
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders["sd3"], subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    assert noise_scheduler.config.shift == 3.0
    model_input, noise = inputs(c)
    timesteps = script_timesteps(noise_scheduler_copy, weighting, B, torch.Generator().manual_seed(2))
    # the same generator gives tsm the script's very timesteps
    assert torch.equal(c.objective.sample_t(B, torch.Generator().manual_seed(2)), timesteps)
    sigmas = script_sigmas(noise_scheduler_copy, timesteps, n_dim=model_input.ndim)
    d_sigma = (timesteps / T - sigmas.flatten()).abs().max().item()  # tsm's sigma is t / T
    with torch.no_grad():
        cond = c.family.encode_prompt(c, CAPTIONS)

    def script(precondition_outputs: int) -> torch.Tensor:
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        model_pred = transformer(
            hidden_states=noisy_model_input,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
        if precondition_outputs:
            model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting_ = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
        target = model_input if precondition_outputs else noise - model_input
        loss = torch.mean(
            (weighting_.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
        )
        return loss.mean()

    tsm_loss = lambda: DiffusionLoss(c)(model_input, noise, timesteps, CAPTIONS)  # noqa: E731
    print(f"\n[parity] sd3 {weighting}: t {timesteps.tolist()}, max |t/T - script sigma| {d_sigma:.3g}")
    assert c.objective.precondition_outputs  # the family's default is the script's
    default = loss_and_grads(c, lambda: tsm_loss().mean())
    assert_same(
        f"sd3 weighting={weighting} precondition_outputs=1", default, loss_and_grads(c, lambda: script(1))
    )
    # the key through the config: the objective of `objective.precondition_outputs=false`
    plain = load_components(
        load_config(
            None,
            [
                "model.family=sd3",
                f"model.path={folders['sd3']}",
                f"objective.weighting={weighting}",
                "objective.precondition_outputs=false",
            ],
        )  # fmt: skip
    ).objective
    c.objective = plain
    ours = loss_and_grads(c, lambda: tsm_loss().mean())
    assert_same(
        f"sd3 weighting={weighting} precondition_outputs=0", ours, loss_and_grads(c, lambda: script(0))
    )
    assert abs(ours[0].item() - default[0].item()) > 1e-3  # the key changes the loss
    print(
        f"[parity] sd3 {weighting}: loss {default[0].item():.6f} (preconditioned), {ours[0].item():.6f} (not)"
    )


def test_flux_step_is_train_dreambooth_lora_flux(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    c = components(folders, "flux")  # objective.weighting unset: the script's default "none"
    assert c.objective.weighting == "none"
    transformer = c.denoiser
    assert transformer.config.guidance_embeds
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders["flux"], subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    model_input, noise = inputs(c)
    weighting_scheme, guidance_scale = "none", 3.5  # the script's defaults
    vae_scale_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", torch.float32
    )
    timesteps = script_timesteps(noise_scheduler_copy, weighting_scheme, B, torch.Generator().manual_seed(3))
    assert torch.equal(c.objective.sample_t(B, torch.Generator().manual_seed(3)), timesteps)
    sigmas = script_sigmas(noise_scheduler_copy, timesteps, n_dim=model_input.ndim)
    with torch.no_grad():
        cond = c.family.encode_prompt(c, CAPTIONS)
    prompt_embeds, pooled_prompt_embeds = cond["encoder_hidden_states"], cond["pooled_projections"]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)

    def script() -> torch.Tensor:
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed_noisy_model_input = FluxPipeline._pack_latents(
            noisy_model_input,
            batch_size=model_input.shape[0],
            num_channels_latents=model_input.shape[1],
            height=model_input.shape[2],
            width=model_input.shape[3],
        )
        assert torch.equal(packed_noisy_model_input, pack_latents(noisy_model_input))
        if transformer.config.guidance_embeds:
            guidance = torch.tensor([guidance_scale]).expand(model_input.shape[0])
        else:
            guidance = None
        model_pred = transformer(
            hidden_states=packed_noisy_model_input,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            return_dict=False,
        )[0]
        model_pred = FluxPipeline._unpack_latents(
            model_pred,
            height=model_input.shape[2] * vae_scale_factor,
            width=model_input.shape[3] * vae_scale_factor,
            vae_scale_factor=vae_scale_factor,
        )
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean(
            (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
        )
        return loss.mean()

    ours = loss_and_grads(c, lambda: DiffusionLoss(c)(model_input, noise, timesteps, CAPTIONS).mean())
    print(f"\n[parity] flux: t {timesteps.tolist()}")
    assert_same("flux weighting=none", ours, loss_and_grads(c, script))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,weighting,mean",
    [
        ("sd3", "logit_normal", 714.0),  # E[1000 * 3s / (1 + 2s)], s = sigmoid(N(0, 1))
        ("sd3", "none", 676.1),  # the same for s uniform
        ("flux", "logit_normal", 500.5),  # unshifted table 1000 .. 1: symmetric about 500.5
        ("flux", "none", 500.5),
    ],
)
def test_timestep_density_is_the_scripts(folders, family, weighting, mean):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from scipy.stats import ks_2samp

    n = 10_000
    cfg = load_config(
        None, [f"model.family={family}", f"model.path={folders[family]}", f"objective.weighting={weighting}"]
    )
    c = load_components(cfg)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders[family], subfolder="scheduler")
    if family == "sd3":  # SD3's scheduler: a fixed shift of 3
        assert noise_scheduler.config.shift == 3.0 and not noise_scheduler.config.use_dynamic_shifting
        assert c.objective.shift == 3.0
    else:  # FLUX.1's: shifted by resolution at inference only, the training table unshifted
        assert noise_scheduler.config.use_dynamic_shifting and c.objective.shift == 1.0
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    ours = c.objective.sample_t(n, torch.Generator().manual_seed(0))
    theirs = script_timesteps(noise_scheduler_copy, weighting, n, torch.Generator().manual_seed(1))
    p = ks_2samp(ours.numpy(), theirs.numpy()).pvalue
    print(
        f"\n[parity] density {family} {weighting}: KS p {p:.3g}, mean tsm {ours.mean().item():.1f} "
        f"script {theirs.mean().item():.1f} (expected {mean})"
    )
    assert p > 1e-3
    tol = 4 * theirs.std().item() / n**0.5  # 4 standard errors of the mean
    assert abs(ours.mean().item() - mean) < tol and abs(theirs.mean().item() - mean) < tol
    assert set(ours.unique().tolist()) <= set(noise_scheduler_copy.timesteps.tolist())  # table entries
