"""Experts on real (tiny, random) diffusers and transformers models.

Each model gets: exact equality with the base model at zero init; per-sample routing in a mixed-timestep
batch equal to running each sample alone (also where layers fold frames or pixels into the batch, as
UNet3D and video transformers do); and `remove_experts` giving back the original module tree.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    ATTN,
    randomize_experts,
    tiny_clip_text,
    tiny_pixart,
    tiny_sd3,
    tiny_t5,
    tiny_unet2d,
    tiny_unet3d,
    tiny_wan,
)

import tsm

INT_T = torch.tensor([30, 400, 999])  # experts 0, 3, 7 of 8
FLOAT_T = torch.tensor([30.5, 437.5, 1000.0])  # flow matching: t = sigma * 1000, t = 1000 allowed


def _randn(*shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


@dataclass
class Case:
    build: Callable
    targets: list[str]
    inputs: Callable[[int], dict]  # batch size -> forward kwargs, without the timestep
    t: torch.Tensor = field(default_factory=lambda: INT_T)
    text: bool = False  # no timestep argument: routed with tsm.set_timesteps


CASES = {
    "unet2d": Case(
        tiny_unet2d,
        [*ATTN, "conv1"],  # conv1: resnet Conv2d experts too
        lambda b: {"sample": _randn(b, 4, 8, 8), "encoder_hidden_states": _randn(b, 5, 32)},
    ),
    "pixart": Case(
        tiny_pixart,
        ATTN,
        lambda b: {
            "hidden_states": _randn(b, 4, 8, 8),
            "encoder_hidden_states": _randn(b, 6, 32),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        },
    ),
    "sd3": Case(
        tiny_sd3,
        [*ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
        lambda b: {
            "hidden_states": _randn(b, 4, 8, 8),
            "encoder_hidden_states": _randn(b, 9, 64),
            "pooled_projections": _randn(b, 64),
        },
        FLOAT_T,
    ),
    "unet3d": Case(  # spatial layers see (B*F) rows, temporal ones (B*H*W); temp_convs hold Conv3d
        tiny_unet3d,
        ["to_k", "to_v", r"re:.*temp_convs\.\d+\.conv\d\.\d+"],
        lambda b: {"sample": _randn(b, 4, 2, 8, 8), "encoder_hidden_states": _randn(b, 5, 32)},
    ),
    "wan": Case(
        tiny_wan,
        ATTN,
        lambda b: {"hidden_states": _randn(b, 4, 2, 8, 8), "encoder_hidden_states": _randn(b, 7, 32)},
        FLOAT_T,
    ),
    "clip_text": Case(
        tiny_clip_text,
        ["q_proj", "v_proj"],
        lambda b: {"input_ids": torch.randint(3, 1000, (b, 7), generator=torch.Generator().manual_seed(b))},
        text=True,
    ),
    "t5": Case(
        tiny_t5,
        ["q", "v"],
        lambda b: {"input_ids": torch.randint(3, 1000, (b, 7), generator=torch.Generator().manual_seed(b))},
        text=True,
    ),
}
TEXT = [name for name, case in CASES.items() if case.text]


def spec_for(case: Case) -> tsm.ExpertSpec:
    return tsm.ExpertSpec(scales=(8, 1), rank=4, alpha=4, targets=case.targets, num_timesteps=1000)


def run(model, case: Case, inputs: dict, t: torch.Tensor) -> torch.Tensor:
    if case.text:
        if any(True for _ in tsm.expert_layers(model)):
            tsm.set_timesteps(model, t)
        return model(**inputs).last_hidden_state
    return model(**inputs, timestep=t, return_dict=False)[0]


def sample(inputs: dict, i: int, batch: int) -> dict:
    """Sample i of a batch of forward kwargs (tensors with a batch dim are sliced, the rest kept)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, dict):
            out[k] = sample(v, i, batch)
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


def merged(model) -> set:
    """The expert ids merged into the base weights, over all expert layers."""
    return {layer.merged for _, layer in tsm.expert_layers(model)}


def module_types(model) -> dict:
    return {name: type(m) for name, m in model.named_modules()}


# ------------------------------------------------------------------------------------------------
# per model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_zero_init_equals_base_exactly(name):
    case = CASES[name]
    model = case.build().eval()
    inputs = case.inputs(len(case.t))
    uniform = case.t[1].expand(len(case.t))
    with torch.no_grad():
        base_mixed, base_uniform = run(model, case, inputs, case.t), run(model, case, inputs, uniform)
        tsm.add_experts(model, spec_for(case))
        assert torch.equal(run(model, case, inputs, case.t), base_mixed)  # routed per sample
        assert torch.equal(run(model, case, inputs, uniform), base_uniform)  # merged single expert
        assert merged(model) == {3}
    assert torch.equal(run(model, case, inputs, case.t), base_mixed)  # autograd on: unmerged path


@pytest.mark.parametrize("name", CASES)
def test_mixed_batch_equals_each_sample_alone(name):
    case = CASES[name]
    model = case.build().eval()
    batch = len(case.t)
    inputs = case.inputs(batch)
    with torch.no_grad():
        base = run(model, case, inputs, case.t)
    randomize_experts(tsm.add_experts(model, spec_for(case))).eval()
    routing = tsm.get_routing(model)
    for grad in (False, True):  # no_grad: single samples take the merged path; grad: the unmerged one
        with torch.set_grad_enabled(grad):
            mixed = run(model, case, inputs, case.t)
            assert routing.state.main.ids.tolist() == tsm.expert_index(case.t, 8, 1000).tolist()
            assert (mixed - base).abs().max() > 1e-3  # the experts do something
            for i in range(batch):
                alone = run(model, case, sample(inputs, i, batch), case.t[i : i + 1])
                assert merged(model) == ({None} if grad else {routing.state.main.uniform})
                torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
                # and the routing matters: the same sample under another expert differs
                other = run(model, case, sample(inputs, i, batch), case.t[(i + 1) % batch].reshape(1))
                assert (other - alone).abs().max() > 1e-4


@pytest.mark.parametrize("name", CASES)
def test_remove_experts_restores_the_model(name):
    case = CASES[name]
    model = case.build().eval()
    types, state = module_types(model), {k: v.clone() for k, v in model.state_dict().items()}
    inputs = case.inputs(len(case.t))
    with torch.no_grad():
        base = run(model, case, inputs, case.t)
        randomize_experts(tsm.add_experts(model, spec_for(case))).eval()
        run(model, case, inputs, case.t[:1].expand(len(case.t)))  # merges an expert into base weights
        run(model, case, inputs, case.t)
        run(model, case, inputs, case.t[2:].expand(len(case.t)))  # leaves another one merged
    assert merged(model) == {7}
    assert module_types(model) != types
    tsm.remove_experts(model)
    assert module_types(model) == types
    restored = model.state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert not model._forward_pre_hooks
    with pytest.raises(tsm.TsmError):
        tsm.get_routing(model)
    with torch.no_grad():
        assert torch.equal(run(model, case, inputs, case.t), base)
    tsm.add_experts(model, spec_for(case))  # and experts can be added again


# ------------------------------------------------------------------------------------------------
# model-specific
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT)
def test_text_encoder_without_routing_raises(name):
    case = CASES[name]
    model = tsm.add_experts(case.build(), spec_for(case))
    with pytest.raises(tsm.TsmError, match="set_timesteps"):
        model(**case.inputs(2))


def test_unet3d_wraps_spatial_and_temporal_layers():
    case = CASES["unet3d"]
    model = tsm.add_experts(case.build(), spec_for(case))
    names = [n for n, _ in tsm.expert_layers(model)]
    assert any(".attentions." in n and n.endswith("attn1.to_k") for n in names)  # spatial
    assert any(".temp_attentions." in n and n.endswith("attn1.to_v") for n in names)  # temporal
    assert any(n.startswith("transformer_in.") for n in names)
    assert any(".temp_convs." in n for n in names)  # Conv3d
    kinds = {type(layer.base_layer) for _, layer in tsm.expert_layers(model)}
    assert kinds == {torch.nn.Linear, torch.nn.Conv3d}


def test_unknown_target_suggests_close_names():
    model = tiny_unet2d()
    spec = tsm.ExpertSpec(targets=["to_q", "to_qq"])
    with pytest.raises(tsm.TsmError, match=r"'to_qq'.*to_q"):
        tsm.add_experts(model, spec)
    assert not any(True for _ in tsm.expert_layers(model))  # nothing half-wrapped


def test_gradient_checkpointing_gives_the_same_adapter_grads():
    case = CASES["unet2d"]
    t = torch.tensor([100, 700])  # foster: sample 0 trains s0_i0, sample 1 trains s1_i0
    inputs = case.inputs(2)
    target = _randn(2, 4, 8, 8)
    model = randomize_experts(tsm.add_experts(case.build(), spec_for(case), stage="foster")).train()
    params = tsm.adapter_params(model)
    probe = next(layer for name, layer in tsm.expert_layers(model) if name.endswith("attn1.to_q"))
    calls = []
    probe.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        calls.clear()
        loss = (run(model, case, inputs, t) - target).pow(2).mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    plain = grads()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) == 2  # the layer really was recomputed during backward
    used = [g is not None for g in plain]
    assert used == [g is not None for g in checkpointed]
    assert 0 < sum(used) < len(params)  # only the experts of the batch's samples get gradients
    for a, b in zip(plain, checkpointed, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_add_experts_keeps_eval_mode():
    case = CASES["pixart"]
    spec = tsm.ExpertSpec(targets=ATTN, dropout=0.5)
    model = randomize_experts(tsm.add_experts(case.build().eval(), spec))  # no .eval() after: as pipelines
    assert not any(layer.training for _, layer in tsm.expert_layers(model))
    inputs, t = case.inputs(2), torch.tensor([100, 100])
    with torch.no_grad():
        first = run(model, case, inputs, t)
        assert merged(model) == {0}
        assert torch.equal(run(model, case, inputs, t), first)  # no dropout in eval mode
