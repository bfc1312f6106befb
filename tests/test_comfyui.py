"""The ComfyUI export: key names ComfyUI's loader maps, and a workflow whose keyframes, run through ComfyUI's own
rules (restated below from comfy/model_sampling.py, comfy/samplers.py and comfy/hooks.py), give every sampling
call exactly one expert: the one tsm routes at that call's timestep."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from test_io import error_of, tiny_unet, with_experts

import tsm
from tsm import comfyui

# ComfyUI's names (comfy/lora.py): kohya for UNets (lora_unet_ + the diffusers module path with _), CLIP text
# encoders as lora_te_ / lora_te1_ / lora_te2_ + text_model_encoder_layers_N_{self_attn_q_proj, mlp_fc1...};
# diffusers' transformer.{module}.lora_A/B.weight for the SD3 / Flux transformers
UNET_KEY = re.compile(
    r"^lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
CLIP_KEY = re.compile(
    r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
FLOW_KEY = re.compile(
    r"^transformer\.(transformer_blocks|single_transformer_blocks)\.\d+\.[a-z0-9_.]+\.lora_[AB]\.weight$"
)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI, restated: model_sampling (sigma tables, timestep, percent_to_sigma), two schedulers, the keyframe rule
# ---------------------------------------------------------------------------------------------------------
class Discrete:  # comfy/model_sampling.py ModelSamplingDiscrete, SD1.x/SDXL settings ("linear", 0.00085, 0.012)
    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def tsm_t(self, sigma):  # the model is fed timestep(sigma), tsm's t
        return float(self.timestep(sigma))


class Flow:  # ModelSamplingDiscreteFlow (SD3, multiplier 1000); the model is fed sigma * 1000
    def __init__(self, shift):
        self.shift = shift
        self.sigmas = self.sigma((torch.arange(1, 1001, 1) / 1000) * 1000)

    def sigma(self, timestep):
        t = timestep / 1000
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 1000)).item()

    def tsm_t(self, sigma):
        return float(sigma * 1000)


class Flux:  # ModelSamplingFlux (shift = mu, 10000 entries); the model is fed sigma, tsm's t is sigma * 1000
    def __init__(self, mu):
        self.mu = mu
        self.sigmas = self.sigma(torch.arange(1, 10001, 1) / 10000)

    def sigma(self, t):
        return math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1) ** 1.0)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.sigma(1.0 - percent)

    def tsm_t(self, sigma):
        return float(sigma) * 1000


def simple_scheduler(s, steps):  # comfy/samplers.py
    ss = len(s.sigmas) / steps
    return torch.FloatTensor([float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def ddim_scheduler(s, steps):  # comfy/samplers.py (sigmas[1] is not ~0 here, so the final 0 is appended)
    sigs, x, ss = [0.0], 1, max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs.append(float(s.sigmas[x]))
        x += ss
    return torch.FloatTensor(sigs[::-1])


class KeyframeGroup:  # comfy/hooks.py HookKeyframeGroup (keyframes sorted by start_percent, guarantee_steps=1)
    def __init__(self, frames, model_sampling):
        self.keyframes = [
            {"strength": s, "start_percent": p, "guarantee_steps": 1}
            for p, s in sorted(
                frames, key=lambda f: f[0]
            )  # get_sorted_list_via_attr: stable in start_percent
        ]
        for kf in self.keyframes:  # initialize_timesteps
            kf["start_t"] = model_sampling.percent_to_sigma(kf["start_percent"])
        self.current, self.index, self.used, self.curr_t = self.keyframes[0], 0, 0, -1.0

    def effective_guarantee(self, kf, max_sigma):
        return 0 if kf["start_t"] > max_sigma else kf["guarantee_steps"]

    def prepare_current_keyframe(self, curr_t, sample_sigmas):
        if curr_t == self.curr_t:
            return
        max_sigma = torch.max(sample_sigmas)
        if self.used >= self.effective_guarantee(self.current, max_sigma):
            for i in range(self.index + 1, len(self.keyframes)):
                kf = self.keyframes[i]
                if kf["start_t"] >= curr_t:  # sigmas: a bigger start_t is an earlier step
                    self.index, self.current, self.used = i, kf, 0
                    if self.effective_guarantee(kf, max_sigma) > 0:
                        break
                else:
                    break
        self.used += 1
        self.curr_t = curr_t

    @property
    def strength(self):
        return self.current["strength"]


def hooks_of(graph) -> dict[str, list[tuple[float, float]]]:
    """lora_name -> its (start_percent, strength) keyframes, read from the graph's node links."""
    out = {}
    for node in graph.values():
        if node["class_type"] != "SetHookKeyframes":
            continue
        lora = graph[node["inputs"]["hooks"][0]]["inputs"]["lora_name"]
        frames, kf = [], node["inputs"]["hook_kf"][0]
        while kf is not None:
            inputs = graph[kf]["inputs"]
            frames.insert(0, (inputs["start_percent"], inputs["strength_mult"]))
            kf = inputs.get("prev_hook_kf", [None])[0]
        out[lora] = frames
    return out


def run_keyframes(hooks, model_sampling, sigmas) -> list[list[str]]:
    """The LoRAs with a non-zero strength at each sampling call (one call per sigma but the last, as Euler)."""
    groups = {name: KeyframeGroup(frames, model_sampling) for name, frames in hooks.items()}
    active = []
    for sigma in sigmas[:-1]:
        for group in groups.values():
            group.prepare_current_keyframe(sigma, sigmas)
        active.append(sorted(name for name, group in groups.items() if group.strength != 0.0))
    return active


def ksampler(graph) -> dict:
    return next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fostered():
    return with_experts(tiny_unet(), scales=(4, 1), targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])


def test_sd15_files_have_comfyui_kohya_names(fostered, tmp_path):
    paths = comfyui.export_run(fostered, "sd15", {"num_train_timesteps": 1000}, tmp_path, prefix="unet")
    assert [p.name for p in paths] == [f"tsm_s0_i{i}.safetensors" for i in range(4)] + ["workflow_api.json"]
    keys = list(load_file(paths[2]))
    bad = [k for k in keys if not UNET_KEY.match(k)]
    assert keys and not bad, bad[:3]
    assert sum(k.endswith(".alpha") for k in keys) == len(keys) // 3


def test_clip_and_flow_names():
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    clip = {"text_encoder.encoder.layers.1.self_attn.q_proj.lora_A.weight": a}
    clip["text_encoder.encoder.layers.1.self_attn.q_proj.lora_B.weight"] = b
    flow = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a}
    flow["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = b
    sd15 = comfyui.to_comfyui(clip, "sd15")
    assert all(CLIP_KEY.match(k) for k in sd15) and any(k.startswith("lora_te_") for k in sd15)
    sd3 = comfyui.to_comfyui({**clip, **flow}, "sd3", text_encoders=3)
    assert set(flow) < set(sd3) and all(CLIP_KEY.match(k) or FLOW_KEY.match(k) for k in sd3)
    assert any(k.startswith("lora_te1_") for k in sd3)
    assert "pixart" in error_of(comfyui.to_comfyui, flow, "pixart")
    t5 = {"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": a}
    assert "text_encoder_3" in error_of(comfyui.to_comfyui, t5, "sd3")


SAMPLINGS = {
    "discrete": ({"kind": "discrete"}, Discrete, ddim_scheduler),
    "flow": ({"kind": "flow", "shift": 3.0}, lambda: Flow(3.0), simple_scheduler),
    "flux": (comfyui.sampling_of("flux", {}, 1024, 768), None, simple_scheduler),
}


def comfy_side(kind: str):
    sampling, make, scheduler = SAMPLINGS[kind]
    return sampling, (make() if make else Flux(sampling["mu"])), scheduler


@pytest.mark.parametrize("kind", list(SAMPLINGS))
def test_schedule_and_percents_are_comfyuis(kind):
    sampling, model_sampling, scheduler = comfy_side(kind)
    torch.testing.assert_close(
        comfyui.sigma_table(sampling), model_sampling.sigmas.float(), rtol=1e-6, atol=0
    )
    for steps in (2, 7, 50):
        ours = comfyui.comfy_sigmas(sampling, comfyui.SAMPLERS[kind][1], steps)
        assert ours == pytest.approx(scheduler(model_sampling, steps).tolist(), rel=1e-6)
        expected_t = [model_sampling.tsm_t(s) for s in scheduler(model_sampling, steps)[:-1]]
        assert comfyui.step_timesteps(sampling, ours) == pytest.approx(expected_t, rel=1e-6)
    for sigma in (0.05, 0.3, 0.77, 0.95) if kind != "discrete" else (0.05, 0.7, 3.3, 12.0):
        p = comfyui.sigma_percent(sigma, sampling)
        assert 0.0 < p < 1.0
        assert model_sampling.percent_to_sigma(p) == pytest.approx(sigma, rel=1e-5)
    if kind == "flux":  # the diffusers pipelines' mu for 1024 x 768: 3072 image tokens
        m = (1.15 - 0.5) / (4096 - 256)
        assert sampling["mu"] == pytest.approx(3072 * m + 0.5 - 256 * m)


@pytest.mark.parametrize("kind", list(SAMPLINGS))
@pytest.mark.parametrize("scale", [4, 8, [875.0]])
@pytest.mark.parametrize("steps", [2, 4, 7, 10, 50])
def test_every_call_runs_exactly_tsms_expert(kind, scale, steps):
    """ComfyUI's keyframe rule walked over the workflow: one LoRA per call, the interval tsm routes the call's
    timestep to; intervals no call falls in have no hook at all."""
    sampling, model_sampling, scheduler = comfy_side(kind)
    n = tsm.intervals.num_intervals(scale)
    names = [f"tsm_s0_i{i}.safetensors" for i in range(n)]
    graph = comfyui.workflow(names, scale, sampling, steps=steps)
    comfyui.check_graph(graph)
    assert ksampler(graph)["steps"] == steps and ksampler(graph)["scheduler"] == comfyui.SAMPLERS[kind][1]
    sigmas = scheduler(model_sampling, steps)  # ComfyUI's schedule for the node's steps and scheduler
    t = torch.tensor([model_sampling.tsm_t(s) for s in sigmas[:-1]])
    expected = [[names[i]] for i in tsm.expert_index(t, scale, 1000).tolist()]
    hooks = hooks_of(graph)
    assert run_keyframes(hooks, model_sampling, sigmas) == expected
    assert set(hooks) == {e[0] for e in expected}  # a LoRA for every interval a call falls in, no other


def test_boundary_keyframes_would_run_two_experts():
    """The walk can fail: keyframes at the interval boundaries themselves (on below hi, off below lo), with 2
    DDIM calls (t = 501, 1) over 4 intervals, run experts 0 and 1 together in the last call -- ComfyUI
    guarantees every keyframe a call, so interval 1's 'on' keyframe takes the call before its 'off' can."""
    model_sampling = Discrete()
    sigmas = ddim_scheduler(model_sampling, 2)

    def percent(t):  # the percent whose sigma sits halfway between table entries ceil(t) - 1 and ceil(t)
        return 1.0 - (math.ceil(t) - 0.5) / 999.0

    hooks = {}
    for i in range(4):
        lo, hi = 250 * i, 250 * (i + 1)
        frames = [(0.0, 1.0)] if hi == 1000 else [(0.0, 0.0), (percent(hi), 1.0)]
        hooks[f"i{i}"] = frames + ([(percent(lo), 0.0)] if lo > 0 else [])
    assert run_keyframes(hooks, model_sampling, sigmas) == [["i2"], ["i0", "i1"]]


def test_default_form_files_hold_the_shared_part_and_the_intervals_expert(tmp_path):
    """The packaged `*_foster` form (4 interval experts of rank 2 beside a shared LoRA of rank 8): each ComfyUI
    file is one LoRA of rank 10 whose up @ down is the layer's s0 B0 A0 + s B_i A_i for its interval."""
    model = with_experts(tiny_unet(), scales=(4,), rank=2, alpha=2, shared_rank=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            layer.shared_B.copy_(0.2 * torch.randn(layer.shared_B.shape, generator=g))
    paths = comfyui.export_run(model, "sd15", {"num_train_timesteps": 1000}, tmp_path, prefix="unet")
    assert [p.name for p in paths] == [f"tsm_s0_i{i}.safetensors" for i in range(4)] + ["workflow_api.json"]
    name, layer = next(iter(tsm.expert_layers(model)))
    kohya = "lora_unet_" + name.replace(".", "_")
    for i in (0, 3):
        f = load_file(paths[i])
        down, up = f[f"{kohya}.lora_down.weight"], f[f"{kohya}.lora_up.weight"]
        assert down.shape[0] == 10 and float(f[f"{kohya}.alpha"]) == 10.0
        a, b = layer.lora_A[f"s0_i{i}"], layer.lora_B[f"s0_i{i}"]
        want = layer.shared_scaling * layer.shared_B @ layer.shared_A + layer.scaling * b @ a
        torch.testing.assert_close(
            up.flatten(1) @ down.flatten(1), want.flatten(1).detach(), rtol=1e-5, atol=1e-6
        )
    graph = json.loads(paths[-1].read_text())
    assert [n["class_type"] for n in graph.values()].count("CreateHookLora") == 4


def test_workflow_graph_is_well_formed(fostered, tmp_path):
    paths = comfyui.export_run(
        fostered,
        "sd15",
        {},
        tmp_path,
        prefix="unet",
        width=640,
        height=384,
        ckpt_name="sd15.safetensors",
        prompt="a cat",
        steps=40,
    )
    graph = json.loads(paths[-1].read_text())
    comfyui.check_graph(graph)
    for node_id, node in graph.items():  # restated here: links point at existing outputs
        required, optional, _ = comfyui.NODES[node["class_type"]]
        assert set(required) <= set(node["inputs"]) <= set(required) | set(optional), node_id
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in graph and value[1] < comfyui.NODES[graph[value[0]]["class_type"]][2]
    kinds = [n["class_type"] for n in graph.values()]
    assert kinds.count("CreateHookLora") == 4 and kinds.count("CombineHooks2") == 3
    assert kinds.count("SetHookKeyframes") == 4 and kinds.count("PairConditioningSetProperties") == 1
    pair = next(k for k, n in graph.items() if n["class_type"] == "PairConditioningSetProperties")
    k = ksampler(graph)
    assert k["positive"] == [pair, 0] and k["negative"] == [pair, 1] and k["steps"] == 40
    latent = graph[k["latent_image"][0]]["inputs"]
    assert (latent["width"], latent["height"]) == (640, 384)
    texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert texts == ["a cat", ""]
    ckpt = next(n for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]
    assert ckpt["ckpt_name"] == "sd15.safetensors"
    # interval 1 = [250, 500) holds the DDIM calls t = 476 .. 251 (stride 25): switched on between the calls at
    # t = 501 and 476, off between t = 251 and 226
    model_sampling = Discrete()
    frames = hooks_of(graph)["tsm_s0_i1.safetensors"]
    assert [s for _, s in frames] == [0.0, 1.0, 0.0]
    on, off = (model_sampling.percent_to_sigma(p) for p, _ in frames[1:])
    sigma = model_sampling.sigma
    assert sigma(torch.tensor(476.0)) < on < sigma(torch.tensor(501.0))
    assert sigma(torch.tensor(226.0)) < off < sigma(torch.tensor(251.0))
    with pytest.raises(ValueError, match="links to output"):
        comfyui.check_graph(
            {**graph, "99": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 5], "vae": ["1", 2]}}}
        )


def test_feature_dependent_router_is_refused(tmp_path):
    assembled = with_experts(tiny_unet(), stage="assemble")  # the asymmetric router: G(z, t) = F(z) + E[t]
    message = error_of(comfyui.export_run, assembled, "sd15", {}, tmp_path, prefix="unet")
    assert "depend on the layer's input" in message and "t_only" in message
    t_only = with_experts(tiny_unet(), stage="assemble", router="t_only")
    paths = comfyui.export_run(t_only, "sd15", {}, tmp_path / "t", prefix="unet")
    assert len(paths) == 5 and load_file(paths[0])  # the stacked step LoRA (core + context) per interval


def test_smooth_routing_is_refused(tmp_path):
    smooth = with_experts(tiny_unet(), scales=(4,), routing="smooth")
    assert "smooth routing" in error_of(comfyui.export_run, smooth, "sd15", {}, tmp_path, prefix="unet")
