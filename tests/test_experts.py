"""Expert layers on small fixed-seed modules: zero init, routing, gradients, stages, merge, PEFT equivalence."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsm
from tsm.experts import ExpertLayer
from tsm.intervals import expert_index


class Net(nn.Module):
    """A toy denoiser with the diffusers calling convention: forward(sample, timestep)."""

    def __init__(self, kind: str = "linear") -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 6)
        else:
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
            self.a, self.b = conv(3, 8, 3, padding=1), conv(8, 3, 3, stride=2, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(sample)))


def make_input(kind: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    shape = {
        "linear": (batch, 5, 6),
        "conv1d": (batch, 3, 8),
        "conv2d": (batch, 3, 6, 6),
        "conv3d": (batch, 3, 4, 4, 4),
    }
    return torch.randn(shape[kind], generator=gen)


def randomize(model: nn.Module, seed: int = 1, routers: bool = True) -> None:
    """Distinct non-zero experts (and routers), so that a wrong routing changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if routers and layer.router is not None:
                for p in layer.router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference(model: nn.Module, kind: str, x: torch.Tensor, t: torch.Tensor, stage: str, train_scales=None):
    """Naive per-sample reference: base layer + that sample's experts, written out by hand, one sample at a time."""
    spec = tsm.get_routing(model).spec
    outs = []
    for b in range(x.shape[0]):
        h = x[b : b + 1]
        for name in ("a", "b"):
            layer: ExpertLayer = getattr(model, name)
            y = layer.base_layer(h)
            idx = [int(expert_index(t[b], s)) for s in spec.scales]
            if train_scales is not None:  # fostering: exactly one expert, of this sample's scale
                s = train_scales[b]
                y = y + spec.scaling * layer._lora(
                    h, layer.lora_A[f"s{s}_i{idx[s]}"], layer.lora_B[f"s{s}_i{idx[s]}"]
                )
            else:
                y = y + spec.scaling * layer._lora(
                    h, layer.lora_A[f"s0_i{idx[0]}"], layer.lora_B[f"s0_i{idx[0]}"]
                )
                if stage == "assemble":
                    r = layer.router
                    if kind == "linear":
                        gate = F.linear(h, r.proj) + r.table[t[b]]  # (1, L, m-1)
                    else:
                        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[h.dim()]
                        gate = conv(h, r.proj, **r.conv_kwargs) + r.table[t[b]].reshape(
                            1, -1, *[1] * (h.dim() - 2)
                        )
                    for j, s in enumerate(range(1, len(spec.scales))):
                        key = f"s{s}_i{idx[s]}"
                        g = gate[..., j : j + 1] if kind == "linear" else gate[:, j : j + 1]
                        y = y + g * spec.scaling * layer._lora(h, layer.lora_A[key], layer.lora_B[key])
            h = torch.tanh(y) if name == "a" else y
        outs.append(h)
    return torch.cat(outs)


KINDS = ["linear", "conv1d", "conv2d", "conv3d"]
T_MIXED = torch.tensor([10, 140, 999, 600, 130, 520])


def injected(kind: str, scales=(4, 2, 1), seed: int = 0, **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    base = Net(kind)
    model = copy.deepcopy(base)
    tsm.add_experts(model, tsm.ExpertSpec(scales=scales, rank=2, alpha=3, targets=["a", "b"], **kw))
    return base, model


# faithful TSM and the variants beyond the paper (tests/test_variants.py)
FORMS = {
    "faithful": {},
    "shared": dict(shared_rank=3),
    "smooth": dict(routing="smooth"),
    "shared+smooth": dict(shared_rank=3, routing="smooth"),
}


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_equals_base_bitwise(kind, form):
    base, model = injected(kind, **FORMS[form])
    x = make_input(kind, 6, torch.Generator().manual_seed(0))
    for stage in ("foster", "assemble"):
        tsm.set_stage(model, stage)
        for train in (True, False):
            model.train(train)
            base.train(train)
            assert torch.equal(model(x, T_MIXED), base(x, T_MIXED))
            with torch.no_grad():  # one timestep for the batch: the single-expert path
                assert torch.equal(model(x, T_MIXED[:1]), base(x, T_MIXED[:1]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", ["foster", "assemble"])
def test_mixed_batch_matches_per_sample_reference(kind, stage):
    _, model = injected(kind)
    tsm.set_stage(model, stage)
    randomize(model)
    x = make_input(kind, 6, torch.Generator().manual_seed(0))
    model.eval()  # core (+ context) routing
    with torch.enable_grad():
        out = model(x, T_MIXED)
    torch.testing.assert_close(out, reference(model, kind, x, T_MIXED, stage), atol=1e-4, rtol=1e-4)
    if stage == "foster":  # training: sample b trains scale b % 3
        model.train()
        out = model(x, T_MIXED)
        ref = reference(model, kind, x, T_MIXED, stage, train_scales=[b % 3 for b in range(6)])
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_foster_gradients_reach_only_routed_experts(kind):
    _, model = injected(kind, scales=(4, 1))
    randomize(model)
    model.train()
    routing = tsm.get_routing(model)
    routing.foster_scales = torch.tensor([0, 0, 0, 1])
    x = make_input(kind, 4, torch.Generator().manual_seed(0))
    model(x, torch.tensor([10, 300, 320, 900])).square().sum().backward()
    for layer in (model.a, model.b):
        got = {k for k, p in layer.lora_A.items() if p.grad is not None}
        assert got == {"s0_i0", "s0_i1", "s1_i0"}  # 300 and 320 share interval 1; s0_i2, s0_i3 got no sample
        assert {k for k, p in layer.lora_B.items() if p.grad is not None} == got
        assert all(layer.lora_A[k].grad.abs().sum() > 0 for k in got)
        assert all(p.grad is None for p in layer.router.parameters())
        assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv3d"])
def test_assemble_gradients_reach_only_routers(kind):
    _, model = injected(kind, scales=(4, 2, 1))
    tsm.set_stage(model, "assemble")
    randomize(model)
    model.train()
    params = tsm.adapter_params(model)
    assert {id(p) for p in params} == {
        id(p) for layer in (model.a, model.b) for p in layer.router.parameters()
    }
    x = make_input(kind, 6, torch.Generator().manual_seed(0))
    model(x, T_MIXED).square().sum().backward()
    for layer in (model.a, model.b):
        assert layer.router.proj.grad.abs().sum() > 0
        # only the rows of the timesteps in the batch receive gradient
        rows = layer.router.table.grad.abs().sum(1).nonzero().squeeze(1)
        assert set(rows.tolist()) == set(T_MIXED.tolist())
        for p in (*layer.lora_A.values(), *layer.lora_B.values(), *layer.base_layer.parameters()):
            assert p.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_assemble_at_init_equals_core_only(kind):
    _, model = injected(kind)
    randomize(model, routers=False)  # non-zero experts, zero-initialised routers
    x = make_input(kind, 6, torch.Generator().manual_seed(0))
    model.eval()
    core_only = model(x, T_MIXED)
    tsm.set_stage(model, "assemble")
    assert torch.equal(model(x, T_MIXED), core_only)


@pytest.mark.parametrize("router", ["symmetric", "z_only", "t_only"])
def test_router_variants(router):
    _, model = injected("linear", scales=(4, 1), router=router)
    randomize(model, routers=False)
    x = make_input("linear", 6, torch.Generator().manual_seed(0))
    model.eval()
    core_only = model(x, T_MIXED)
    tsm.set_stage(model, "assemble")
    torch.testing.assert_close(model(x, T_MIXED), core_only, atol=0, rtol=0)  # every variant starts core-only
    r = model.a.router
    assert r.num_gates == (2 if router == "symmetric" else 1)
    assert hasattr(r, "proj") == (router != "t_only") and hasattr(r, "table") == (router != "z_only")
    model.train()
    model(x, T_MIXED).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tsm.adapter_params(model))


def test_layers_that_fold_frames_into_the_batch():
    """A video model runs spatial layers on (B*F, ...): each sample's frames follow the sample's expert."""
    torch.manual_seed(0)
    layer_model = nn.Sequential(nn.Linear(6, 6))
    tsm.add_experts(layer_model, tsm.ExpertSpec(scales=(4,), rank=2, targets=["0"]))
    randomize(layer_model)
    t = torch.tensor([100, 900])
    tsm.set_timesteps(layer_model, t)
    x = torch.randn(2 * 3, 5, 6)  # (B*F, L, C), sample-major
    out = layer_model(x)
    for b in range(2):
        tsm.set_timesteps(layer_model, t[b : b + 1])
        torch.testing.assert_close(out[3 * b : 3 * b + 3], layer_model(x[3 * b : 3 * b + 3]))
    tsm.set_timesteps(layer_model, torch.tensor([1, 2, 999, 4]))
    with pytest.raises(tsm.TsmError, match="batch of 6 rows"):
        layer_model(x)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_merge_equals_unmerged_and_restores_base_exactly(kind):
    _, model = injected(kind, scales=(8, 1))
    randomize(model)
    model.eval()
    w0 = model.a.base_layer.weight.detach().clone()
    x = make_input(kind, 3, torch.Generator().manual_seed(0))
    for stage in ("foster", "assemble"):
        tsm.set_stage(model, stage)
        for t in (0, 130, 999):
            tt = torch.full((3,), t)
            with torch.enable_grad():  # autograd on: unmerged path
                unmerged = model(x, tt)
            with torch.no_grad():
                merged = model(x, tt)
            assert model.a.merged == int(expert_index(t, 8))
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in torch.randint(0, 1000, (1000,), generator=g):  # 1000 interval switches
            model(x[:1], t)
    assert model.a.merged is not None and not torch.equal(model.a.base_layer.weight, w0)
    tsm.unmerge_all(model)
    assert torch.equal(model.a.base_layer.weight, w0)
    with torch.no_grad():  # training mode unmerges by itself
        model(x[:1], torch.tensor(5))
    model.train()
    model(x[:1], torch.tensor(5))
    assert model.a.merged is None and torch.equal(model.a.base_layer.weight, w0)


def test_remove_experts_gives_back_original_modules():
    base, model = injected("linear")
    a, b = model.a.base_layer, model.b.base_layer
    randomize(model)
    model.eval()
    with torch.no_grad():
        model(make_input("linear", 1, torch.Generator()), torch.tensor(3))  # leaves a merged weight
    tsm.remove_experts(model)
    assert model.a is a and model.b is b and not hasattr(model, tsm.inject.ATTR)
    assert model.state_dict().keys() == base.state_dict().keys()
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert model._forward_pre_hooks == {}
    tsm.add_experts(model, tsm.get_routing(injected("linear")[1]).spec)  # can be added again


def test_one_expert_equals_peft_lora():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = Net("conv2d")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    tsm.add_experts(
        ours, tsm.ExpertSpec(scales=(4,), rank=2, alpha=6, targets=["a", "b"], num_timesteps=1000)
    )
    randomize(ours)
    theirs = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["a", "b"]), theirs)
    with torch.no_grad():
        for name in ("a", "b"):
            peft_layer = getattr(theirs, name)
            peft_layer.lora_A["default"].weight.copy_(getattr(ours, name).lora_A["s0_i2"])
            peft_layer.lora_B["default"].weight.copy_(getattr(ours, name).lora_B["s0_i2"])
    x = make_input("conv2d", 3, torch.Generator().manual_seed(0))
    t = torch.tensor([500, 600, 749])  # all in interval 2 of 4
    torch.testing.assert_close(ours(x, t), theirs(x, t), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours(x, t + 250), theirs(x, t))


# ---------------------------------------------------------------------------------------------------------
def test_joint_fostering_equals_separate_runs():
    """Fostering scales (4, 1) in one run with mixed-t batches == training every expert alone on its samples."""
    spec = tsm.ExpertSpec(scales=(4, 1), rank=2, alpha=2, targets=["a", "b"])
    torch.manual_seed(0)
    base = Net("linear")
    g = torch.Generator().manual_seed(1)
    steps = [(make_input("linear", 8, g), torch.randint(0, 1000, (8,), generator=g)) for _ in range(6)]
    # a few batches leave some fine experts without samples, so their optimizer state must not move
    steps[2] = (steps[2][0], torch.tensor([10, 20, 30, 40, 999, 999, 999, 999]))
    scales_of = torch.arange(8) % 2

    def make():
        model = copy.deepcopy(base)
        tsm.add_experts(model, spec)
        randomize(model, seed=7)
        model.train()
        return model, torch.optim.AdamW(tsm.adapter_params(model), lr=1e-2, weight_decay=0.1)

    def step(model, opt, x, t, target_fn):
        opt.zero_grad(set_to_none=True)
        per_sample = model(x, t).sub(target_fn(x)).square().flatten(1).mean(1)
        (tsm.expert_loss_weights(model) * per_sample).sum().backward()
        tsm.clip_grad_norm_per_expert(model, 0.05)  # small enough to clip: clipping must be per expert too
        opt.step()

    target_fn = lambda x: x.flip(-1)  # noqa: E731
    joint, opt = make()
    for x, t in steps:
        step(joint, opt, x, t, target_fn)

    for s, n in enumerate(spec.experts_per_scale):
        for i in range(n):
            alone, opt = make()
            tsm.get_routing(alone).foster_scales = s
            for x, t in steps:
                mine = (scales_of == s) & (expert_index(t, spec.scales[s]) == i)
                if mine.any():
                    step(alone, opt, x[mine], t[mine], target_fn)
            key = f"s{s}_i{i}"
            for name in ("a", "b"):
                for bank in ("lora_A", "lora_B"):
                    got = getattr(getattr(joint, name), bank)[key]
                    want = getattr(getattr(alone, name), bank)[key]
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            assert not torch.equal(alone.a.lora_B[key], make()[0].a.lora_B[key])  # it did train


def test_set_stage_and_adapter_params():
    _, model = injected("linear", scales=(4, 1))
    n_expert = sum(
        p.numel() for layer in (model.a, model.b) for p in (*layer.lora_A.values(), *layer.lora_B.values())
    )
    assert sum(p.numel() for p in tsm.adapter_params(model)) == n_expert
    assert all(not p.requires_grad for p in model.a.base_layer.parameters())
    tsm.set_stage(model, "assemble")
    # routers: F (1 gate x in) + E (T x 1 gate) for a (in 6) and b (in 12)
    assert sum(p.numel() for p in tsm.adapter_params(model)) == (6 + 1000) + (12 + 1000)
    with pytest.raises(tsm.TsmError, match="stage must be"):
        tsm.set_stage(model, "train")
    with pytest.raises(tsm.TsmError, match="already has experts"):
        tsm.add_experts(model, tsm.ExpertSpec(targets=["a"]))
    with pytest.raises(tsm.TsmError, match="has no experts"):
        tsm.adapter_params(Net())


def test_timestep_scale_for_unit_interval_models():
    """Flux-style models take t in [0, 1]; timestep_scale=1000 routes them like t * 1000."""
    _, model = injected("linear", scales=(4,), timestep_scale=1000.0)
    x = make_input("linear", 2, torch.Generator())
    model(x, torch.tensor([0.1, 0.9]))
    assert tsm.get_routing(model).state.main.ids.tolist() == [0, 3]
    with pytest.raises(tsm.TsmError, match="out of range"):
        model(x, torch.tensor([2.0, 0.5]))


def test_experts_off_is_the_base_model_with_no_copy():
    base, model = injected("conv2d", scales=(4, 1))
    randomize(model)
    x = make_input("conv2d", 3, torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    model.eval()
    with torch.no_grad():
        with_experts = model(x, t[:1].expand(3))  # merges the core expert into the base weight
        assert model.a.merged is not None
        with tsm.experts_off(model):
            assert torch.equal(model(x, t), base(x, t))  # unmerged on the way in: exactly the base
        assert torch.equal(model(x, t[:1].expand(3)), with_experts)
    model.train()
    with tsm.experts_off(model):
        assert not model(x, t).requires_grad  # no expert in the graph: the teacher costs no adapter gradient
    assert model(x, t).requires_grad
