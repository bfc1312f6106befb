"""Expert variants: a shared full-range expert beside the routed ones, smooth (hat-weighted) routing, and the
merged fast path. Each keeps the core guarantees, on tiny fixed-seed layers and a tiny diffusers pipeline."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_experts import FORMS, KINDS, Net, injected, make_input
from test_io import denoise, tiny_pipeline, tiny_unet

import tsm
from tsm.config import Config, ExpertsConfig, validate
from tsm.experts import ExpertLayer
from tsm.intervals import expert_index
from tsm.routing import hat_weights

VARIANTS = {name: kw for name, kw in FORMS.items() if name != "faithful"}


def randomize(model, seed: int = 1) -> None:
    """Distinct non-zero experts, shared expert and routers, so that a wrong path changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            for p in layer.parameters():
                if p is not layer.base_layer.weight and p is not layer.base_layer.bias:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def one_by_one(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each sample alone: the uniform (single-expert) path, the reference for mixed batches."""
    return torch.cat([model(x[b : b + 1], t[b : b + 1]) for b in range(x.shape[0])])


# ---------------------------------------------------------------------------------------------------------
# spec and config
# ---------------------------------------------------------------------------------------------------------
def test_spec_fields_validate_and_faithful_json_is_unchanged():
    faithful = tsm.ExpertSpec()
    assert "shared_rank" not in faithful.to_json() and "routing" not in faithful.to_json()
    spec = tsm.ExpertSpec(shared_rank=2, routing="smooth")
    assert tsm.ExpertSpec.from_json(spec.to_json()) == spec
    assert tsm.ExpertSpec.from_json(faithful.to_json()) == faithful
    with pytest.raises(tsm.TsmError, match="shared_rank must be"):
        tsm.ExpertSpec(shared_rank=-1)
    with pytest.raises(tsm.TsmError, match="routing must be one of hard, smooth"):
        tsm.ExpertSpec(routing="soft")
    for bad, match in (({"shared_rank": -2}, "experts.shared_rank"), ({"routing": "x"}, "experts.routing")):
        with pytest.raises(tsm.TsmError, match=match):
            validate(Config(experts=ExpertsConfig(**bad)))


def stand_in_components() -> SimpleNamespace:
    """What `expert_specs` reads of a loaded model: a family with two targets, no text experts, T = 1000."""
    family = SimpleNamespace(
        default_targets=["a", "b"],
        timestep_scale=1.0,
        denoiser_subfolder="unet",
        default_text_targets=[],
        text_expert_subfolders=[],
    )
    return SimpleNamespace(family=family, objective=SimpleNamespace(num_timesteps=1000))


def test_config_keys_reach_the_expert_specs():
    from tsm.recipes.run import expert_specs

    c = stand_in_components()
    cfg = Config(experts=ExpertsConfig(scales=[4, 1], shared_rank=3, routing="smooth"))
    cfg.train.method = "foster"
    spec = expert_specs(cfg, c)["unet"]
    assert (spec.shared_rank, spec.routing) == (3, "smooth")
    model = tsm.add_experts(Net(), spec)
    assert model.a.shared_A.shape == (3, 6) and model.a.shared_B.shape == (12, 3)
    assert torch.equal(model.a.shared_B, torch.zeros(12, 3))
    default = expert_specs(Config(), c)["unet"]
    assert (default.shared_rank, default.routing) == (0, "hard")
    assert tsm.add_experts(Net(), default).a.shared_A is None


# ---------------------------------------------------------------------------------------------------------
# hat weights
# ---------------------------------------------------------------------------------------------------------
def test_hat_weights_at_centres_midpoints_and_ends():
    # 4 uniform intervals of 1000: centres 125, 375, 625, 875
    t = torch.tensor([0.0, 125.0, 250.0, 375.0, 437.5, 500.0, 875.0, 900.0, 1000.0])
    lo, hi, w = hat_weights(t, 4, 1000)
    assert lo.tolist() == [0, 0, 0, 1, 1, 1, 3, 3, 3]
    assert hi.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert w.tolist() == [0.0, 0.0, 0.5, 0.0, 0.25, 0.5, 0.0, 0.0, 0.0]
    # cut points [200]: intervals [0, 200) and [200, 1000], centres 100 and 600 (not evenly spaced)
    lo, hi, w = hat_weights(torch.tensor([50, 100, 200, 350, 600, 999]), (200.0,), 1000)
    assert lo.tolist() == [0, 0, 0, 0, 1, 1] and hi.tolist() == [0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.2, 0.5, 0.0, 0.0]))
    lo, hi, w = hat_weights(torch.tensor([0, 500, 1000]), 1, 1000)  # one interval: always expert 0
    assert lo.tolist() == hi.tolist() == [0, 0, 0] and w.tolist() == [0.0, 0.0, 0.0]


def test_smooth_update_is_continuous_in_t():
    _, model = injected("linear", scales=(4,), routing="smooth")
    randomize(model)
    model.eval()
    x = make_input("linear", 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch.stack([model(x, torch.tensor([t])) for t in torch.arange(0, 1001, 5.0)])
    steps = (out[1:] - out[:-1]).abs().amax((1, 2, 3))
    hard = injected("linear", scales=(4,))[1]
    randomize(hard)
    hard.eval()
    with torch.no_grad():
        jump = (hard(x, torch.tensor([249.0])) - hard(x, torch.tensor([250.0]))).abs().max()
    assert steps.max() < jump / 5  # no jump at the interval edges (hard routing jumps there)


# ---------------------------------------------------------------------------------------------------------
# zero init, mixed batches
# ---------------------------------------------------------------------------------------------------------
# (zero init equals the base bitwise for every variant: tests/test_experts.py)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_sample_alone(variant, kind):
    _, model = injected(kind, **VARIANTS[variant])
    randomize(model)
    x = make_input(kind, 6, torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 140.0, 999.0, 600.0, 130.0, 520.0])
    for stage in ("foster", "assemble"):
        tsm.set_stage(model, stage)
        for train in (False, True):
            model.train(train)
            routing = tsm.get_routing(model)
            routing.foster_scales = torch.tensor([0, 1, 2, 0, 0, 1])
            mixed = model(x, t)
            alone = []
            for b in range(6):  # each sample alone, with the scale it has in the batch
                routing.foster_scales = torch.tensor([0, 1, 2, 0, 0, 1])[b : b + 1]
                alone.append(model(x[b : b + 1], t[b : b + 1]))
            # a batch of 6 and batches of 1 sum a conv3d in another order (measured: 2.1e-5 on one machine's
            # CPU kernels, 1e-5 on another); a misrouted sample differs by the expert's whole update
            torch.testing.assert_close(mixed, torch.cat(alone), atol=5e-5, rtol=1e-5)


def test_shared_and_smooth_layer_math_by_hand():
    """y = base(x) + s0 B0 A0 x + s ((1 - w) B_lo A_lo + w B_hi A_hi) x, written out for one linear layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    tsm.add_experts(
        model, tsm.ExpertSpec(scales=(4,), rank=2, alpha=6, targets=["0"], shared_rank=3, routing="smooth")
    )
    randomize(model)
    layer: ExpertLayer = model[0]
    x = torch.randn(3, 4, 6)
    t = torch.tensor([437.5, 100.0, 1000.0])  # w = 0.25 between experts 1 and 2; the first end; the last end
    tsm.set_timesteps(model, t)
    got = model(x)
    s = 3.0  # alpha / rank; the shared expert has the same scaling

    def lora(key, h):
        return F.linear(F.linear(h, layer.lora_A[key]), layer.lora_B[key])

    shared = s * F.linear(F.linear(x, layer.shared_A), layer.shared_B)
    want = layer.base_layer(x) + shared
    want[0] += s * (0.75 * lora("s0_i1", x[0]) + 0.25 * lora("s0_i2", x[0]))
    want[1] += s * lora("s0_i0", x[1])
    want[2] += s * lora("s0_i3", x[2])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def test_smooth_fostering_sends_each_sample_to_both_experts_with_its_weights():
    _, model = injected("linear", scales=(4, 1), routing="smooth")
    randomize(model)
    with torch.no_grad():  # experts 1 and 2 identical: their gradients differ only by the hat weights
        for layer in (model.a, model.b):
            layer.lora_A["s0_i2"].copy_(layer.lora_A["s0_i1"])
            layer.lora_B["s0_i2"].copy_(layer.lora_B["s0_i1"])
    model.train()
    tsm.get_routing(model).foster_scales = torch.tensor([0, 1])
    x = make_input("linear", 2, torch.Generator().manual_seed(0))
    t = torch.tensor([437.5, 450.0])  # sample 0: w = 0.25 (experts 1, 2); sample 1: the full-range expert
    per_sample = model(x, t).square().flatten(1).mean(1)
    weights = tsm.expert_loss_weights(model)
    assert weights.tolist() == [1.0, 1.0]  # one group for the finest scale, one for scale 1
    (weights * per_sample).sum().backward()
    for layer in (model.a, model.b):
        assert {k for k, p in layer.lora_B.items() if p.grad is not None} == {"s0_i1", "s0_i2", "s1_i0"}
        torch.testing.assert_close(layer.lora_B["s0_i2"].grad, layer.lora_B["s0_i1"].grad / 3)
        torch.testing.assert_close(layer.lora_A["s0_i2"].grad, layer.lora_A["s0_i1"].grad / 3)
    routing = tsm.get_routing(model)
    routing.foster_scales = 0
    model(x, torch.tensor([10.0, 900.0]))  # ends and finest-scale samples: one loss group of 2
    assert tsm.expert_loss_weights(model).tolist() == [0.5, 0.5]
    ids = routing.loss_ids(torch.tensor([10.0, 900.0, 500.0]), torch.tensor([0, 0, 1]))
    assert ids.tolist() == [0, 0, 4]  # what the training recipe weights by


def _fostering_setup():
    spec = tsm.ExpertSpec(scales=(4, 1), rank=2, alpha=2, targets=["a", "b"], shared_rank=2)
    torch.manual_seed(0)
    base = Net("linear")
    g = torch.Generator().manual_seed(1)
    x, t = make_input("linear", 8, g), torch.tensor([10, 20, 300, 40, 999, 600, 610, 620])
    return spec, base, x, t


def _grads(model, x, t, weights_fn, target):
    model.zero_grad(set_to_none=True)
    per_sample = model(x, t).sub(target).square().flatten(1).mean(1)
    (weights_fn(model, per_sample) * per_sample).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_fostering_residual_gradients_equal_separate_runs_given_the_shared_weights():
    """Joint fostering with a shared expert does NOT equal separate runs: every expert's output depends on the
    shared expert, which learns from all samples, so after one step each expert sees a shared part that a
    separate run (training its samples only) would have moved differently. What holds, step by step: given the
    same shared weights, each residual expert's gradient equals that of a run on its own samples (its own
    mean loss), and the shared expert's gradient is that of the plain batch mean."""
    spec, base, x, t = _fostering_setup()
    target = x.flip(-1)

    def make():
        model = tsm.add_experts(copy.deepcopy(base), spec)
        randomize(model, seed=7)
        return model.train()

    joint = make()
    got = _grads(joint, x, t, lambda m, _: tsm.expert_loss_weights(m), target)
    scales_of = torch.arange(8) % 2
    for s, n in enumerate(spec.experts_per_scale):
        for i in range(n):
            mine = (scales_of == s) & (expert_index(t, spec.scales[s]) == i)
            if not mine.any():
                continue
            alone = make()
            tsm.get_routing(alone).foster_scales = s
            want = _grads(
                alone, x[mine], t[mine], lambda m, ps: torch.full_like(ps, 1 / len(ps)), target[mine]
            )
            for name in ("a", "b"):
                for bank in ("lora_A", "lora_B"):
                    key = f"{name}.{bank}.s{s}_i{i}"
                    torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
    # the shared expert: the gradient of the plain batch mean (no gradient rescaling: scale 1 per sample)
    reference = make()
    tsm.get_routing(reference).shared_grad_scale = torch.ones(8)
    want = _grads(reference, x, t, lambda m, ps: torch.full_like(ps, 1 / 8), target)
    for name in ("a.shared_A", "a.shared_B", "b.shared_A", "b.shared_B"):
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
        assert got[name].abs().sum() > 0
    norms = tsm.clip_grad_norm_per_expert(joint, 1e-3)  # the shared expert is clipped on its own
    shared_norm = torch.cat([joint.a.shared_A.grad.flatten(), joint.a.shared_B.grad.flatten()])
    shared_norm = torch.cat([shared_norm, joint.b.shared_A.grad.flatten(), joint.b.shared_B.grad.flatten()])
    assert "shared" in norms and norms["shared"] > 1e-3
    torch.testing.assert_close(shared_norm.norm(), torch.tensor(1e-3), atol=1e-6, rtol=1e-4)


def test_shared_expert_trains_in_fostering_and_freezes_in_assembling():
    _, model = injected("linear", scales=(4, 1), shared_rank=2)
    params = {id(p) for p in tsm.adapter_params(model)}
    assert id(model.a.shared_A) in params and id(model.b.shared_B) in params
    tsm.set_stage(model, "assemble")
    assert id(model.a.shared_A) not in {id(p) for p in tsm.adapter_params(model)}
    assert not model.a.shared_A.requires_grad


# ---------------------------------------------------------------------------------------------------------
# merged sampling and the fast path
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_merged_sampling_equals_unmerged_and_restores_base(variant, kind):
    _, model = injected(kind, scales=(8, 1), **VARIANTS[variant])
    randomize(model)
    model.eval()
    w0 = model.a.base_layer.weight.detach().clone()
    x = make_input(kind, 2, torch.Generator().manual_seed(0))
    for stage in ("foster", "assemble"):
        tsm.set_stage(model, stage)
        for t in (0.0, 100.0, 130.0, 187.5, 999.0):
            tt = torch.full((2,), t)
            with torch.enable_grad():
                unmerged = model(x, tt)
            with torch.no_grad():
                merged = model(x, tt)
            assert model.a.merged is not None
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    if "smooth" in variant:  # 100 lies between the centres 62.5 and 187.5: a blend, merged as (lo, hi, w)
        with torch.no_grad():
            model(x, torch.full((2,), 100.0))
        assert model.a.merged == (0, 1, 0.30000001192092896)
    tsm.unmerge_all(model)
    assert torch.equal(model.a.base_layer.weight, w0)


class Counting:
    """Counts calls of ExpertLayer.forward (the wrapper's own forward, not the base layer's)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = ExpertLayer.forward

        def forward(layer, *args, **kwargs):
            self.calls += 1
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(ExpertLayer, "forward", forward)


@pytest.mark.parametrize("variant", ["hard", "shared"])
def test_fast_path_skips_the_wrapper_and_gives_the_slow_paths_outputs(variant, monkeypatch):
    base, model = injected("conv2d", scales=(8, 1), **({"shared_rank": 2} if variant == "shared" else {}))
    randomize(model)
    model.eval()
    slow = copy.deepcopy(model)
    x = make_input("conv2d", 2, torch.Generator().manual_seed(0))
    counter = Counting(monkeypatch)
    steps = [990, 960, 930, 880, 860, 10]  # intervals 7, 7, 7, 7, 6, 0
    with torch.no_grad():
        outs = []
        for t in steps:
            outs.append(model(x, torch.tensor(t)))
            tsm.get_routing(slow).leave_fast_path()  # the reference never keeps the fast path
            assert torch.equal(outs[-1], slow(x, torch.tensor(t)))
    # the model's two layers run their wrapper on the first step only: at the interval changes (steps 4, 5)
    # the hook merges the new expert into them and they stay on the fast path; the reference copy, sent back
    # to the slow path every step, runs it at every step
    assert counter.calls == 2 * 1 + 2 * len(steps)
    assert model.a.forward == model.a.base_layer.forward  # still on the fast path
    with torch.enable_grad():  # autograd on: the hook sends the layers back, the experts get gradients
        model(x, torch.tensor(10)).sum().backward()
    assert model.a.lora_B["s0_i0"].grad is not None and "forward" not in model.a.__dict__
    with torch.no_grad():
        model(x, torch.tensor(10))
        assert "forward" in model.a.__dict__
        with tsm.experts_off(model):  # leaving the experts on also leaves the fast path
            assert "forward" not in model.a.__dict__
            assert torch.equal(model(x, torch.tensor(10)), base(x, torch.tensor(10)))
        assert torch.equal(model(x, torch.tensor(10)), outs[-1])  # merged again, exactly as before


# ---------------------------------------------------------------------------------------------------------
# files: save/load, a step as one diffusers LoRA
# ---------------------------------------------------------------------------------------------------------
def _unet_with(stage: str, **spec):
    base = tiny_unet()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    tsm.add_experts(model, tsm.ExpertSpec(scales=(4, 1), rank=2, alpha=4, **spec), stage=stage)
    randomize(model, seed=2)
    return base, model.eval()


def test_save_load_roundtrip_keeps_the_shared_expert(tmp_path):
    _, model = _unet_with("foster", shared_rank=3, routing="smooth")
    path = tsm.save(model, tmp_path / "experts.safetensors")
    assert any(k.endswith(".shared_A") for k in load_file(path))
    _, other = _unet_with("foster", shared_rank=3, routing="smooth")
    with torch.no_grad():
        for p in tsm.adapter_params(other):
            p.zero_()
    tsm.load(other, path)
    assert torch.equal(denoise(other, 300), denoise(model, 300))
    _, hard = _unet_with("foster", shared_rank=3)
    with pytest.raises(tsm.TsmError, match="routing smooth != hard"):
        tsm.load(hard, path)
    _, plain = _unet_with("foster")
    with pytest.raises(tsm.TsmError, match="shared_rank 3 != 0"):
        tsm.load(plain, path)


@pytest.mark.parametrize(
    "stage, spec, t, rank",
    [
        ("foster", dict(shared_rank=3), 600, 3 + 2),  # shared + core expert 2
        ("foster", dict(routing="smooth"), 300, 2 + 2),  # 300: 0.7 expert 0 + 0.3 expert 1 (centres 125, 375)
        # shared + the blend of experts 2 and 3 at 700 + the gated full-range context expert
        ("assemble", dict(shared_rank=3, routing="smooth", router="t_only"), 700, 3 + 2 + 2 + 2),
    ],
)
def test_export_step_lora_is_the_model_at_that_step_in_diffusers(tmp_path, stage, spec, t, rank):
    base, model = _unet_with(stage, **spec)
    path = tsm.io.export_step_lora(model, t, tmp_path / "step.safetensors")
    ranks = {v.shape[0] for k, v in load_file(path).items() if k.endswith("lora_A.weight")}
    assert ranks == {rank}
    pipe = tiny_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(path)
    want = denoise(model, t)
    torch.testing.assert_close(denoise(pipe.unet, t), want, rtol=1e-5, atol=5e-5)
    assert not torch.allclose(denoise(pipe.unet, t), denoise(base, t), atol=1e-3)
    assert not torch.allclose(denoise(pipe.unet, t), denoise(model, t + 60), atol=1e-4)  # another step
    if stage == "foster" and "shared_rank" in spec:  # export_lora of one expert stacks the shared one too
        one = tsm.export_lora(model, tmp_path / "one.safetensors", scale=0, index=2)
        pipe = tiny_pipeline(copy.deepcopy(base))
        pipe.load_lora_weights(one)
        torch.testing.assert_close(denoise(pipe.unet, 600), want, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("variant", ["hard", "smooth"])
def test_a_scalar_ts_routing_is_built_once_and_equals_a_fresh_one(variant):
    _, model = injected("linear", scales=(4, 1), routing=variant)
    routing = tsm.get_routing(model)
    tsm.set_stage(model, "assemble")
    routing.set_timesteps(torch.tensor(300.0), batch_size=2)
    first = routing.state
    routing.set_timesteps(torch.tensor(300.0), batch_size=2)
    assert routing.state is first  # from the memo
    fresh = tsm.routing.Routing(routing.spec)
    fresh.set_stage("assemble")
    fresh.set_timesteps(torch.tensor([300.0, 300.0]))  # two values: the general path, no memo
    assert (
        torch.equal(first.main.ids, fresh.state.main.ids) and first.main.uniform == fresh.state.main.uniform
    )
    assert torch.equal(first.t_index, fresh.state.t_index)
    assert [r.ids.tolist() for r in first.context] == [r.ids.tolist() for r in fresh.state.context]
    if variant == "smooth":
        assert first.blend.uniform == fresh.state.blend.uniform == pytest.approx(0.7)
        assert torch.equal(first.blend.route.ids, fresh.state.blend.route.ids)
    tsm.set_stage(model, "foster")  # another stage routes otherwise: the memo is cleared
    routing.set_timesteps(torch.tensor(300.0), batch_size=2)
    assert routing.state is not first and routing.state.context == []
