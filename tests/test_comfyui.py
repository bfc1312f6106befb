"""The ComfyUI export: key names ComfyUI's loader maps, keyframe percents that reproduce the interval
boundaries through ComfyUI's percent -> sigma formulas, and a well-formed API-JSON node graph."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from test_io import error_of, tiny_unet, with_experts

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


# ComfyUI's percent_to_sigma (comfy/model_sampling.py), restated for the test
def discrete_t(p: float) -> float:  # ModelSamplingDiscrete: sigma((1 - p) * 999), log-linear in the table
    return (1.0 - p) * 999.0


def flow_sigma(p: float, shift: float) -> float:  # ModelSamplingDiscreteFlow: time_snr_shift(shift, 1 - p)
    u = 1.0 - p
    return shift * u / (1 + (shift - 1) * u)


def flux_sigma(p: float, mu: float) -> float:  # ModelSamplingFlux: flux_time_shift(mu, 1.0, 1 - p)
    u = 1.0 - p
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


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


@pytest.mark.parametrize(
    "sampling",
    [{"kind": "discrete"}, {"kind": "flow", "shift": 3.0}, comfyui.sampling_of("flux", {}, 1024, 768)],
)
def test_percents_reproduce_the_boundaries(sampling):
    for boundary in (125.0, 250.0, 500.0, 875.0, 333.5):
        p = comfyui.boundary_percent(boundary, sampling)
        assert 0.0 < p < 1.0
        if sampling["kind"] == "discrete":
            # ComfyUI feeds the nearest table entry: the crossing sits halfway below the first owned integer
            assert discrete_t(p) == pytest.approx(math.ceil(boundary) - 0.5, abs=1e-9)
            # every integer t the expert below owns is past the keyframe, every one above is not
            owned_above = range(math.ceil(boundary), 1000)
            assert all(t > discrete_t(p) for t in owned_above)
            assert all(t < discrete_t(p) for t in range(math.ceil(boundary)))
        elif sampling["kind"] == "flow":
            assert flow_sigma(p, 3.0) * 1000 == pytest.approx(boundary, abs=1e-9)
        else:
            assert flux_sigma(p, sampling["mu"]) * 1000 == pytest.approx(boundary, abs=1e-9)
    # the flux shift is the diffusers pipelines' mu for 1024 x 768 (4096 tokens / 16 ... here 3072)
    if sampling["kind"] == "flux":
        m = (1.15 - 0.5) / (4096 - 256)
        assert sampling["mu"] == pytest.approx(3072 * m + 0.5 - 256 * m)


def test_workflow_graph_is_well_formed(fostered, tmp_path):
    paths = comfyui.export_run(
        fostered, "sd15", {}, tmp_path, prefix="unet", ckpt_name="sd15.safetensors", prompt="a cat", steps=40
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
    ksampler = next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]
    pair = next(k for k, n in graph.items() if n["class_type"] == "PairConditioningSetProperties")
    assert ksampler["positive"] == [pair, 0] and ksampler["negative"] == [pair, 1] and ksampler["steps"] == 40
    texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert texts == ["a cat", ""]
    # interval 1 = [250, 500): off, on below t 500, off below t 250
    lora = next(k for k, n in graph.items() if n["inputs"].get("lora_name") == "tsm_s0_i1.safetensors")
    setter = next(n for n in graph.values() if n["inputs"].get("hooks") == [lora, 0])
    frames, kf = [], setter["inputs"]["hook_kf"][0]
    while kf is not None:
        node = graph[kf]["inputs"]
        frames.insert(0, (node["start_percent"], node["strength_mult"]))
        kf = node.get("prev_hook_kf", [None])[0]
    expected = [(0.0, 0.0), (1 - 499.5 / 999, 1.0), (1 - 249.5 / 999, 0.0)]
    assert [f for pair in frames for f in pair] == pytest.approx([f for pair in expected for f in pair])
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
