"""Two training variants on the digits model: warm start (``train.warm_start_fraction``: one LoRA on every t,
copied into every expert, which then specialises) and joint assembling (``train.assemble_experts_lr``: the
experts keep training with the routers). Runs of a few steps; "resumed" runs restart from a checkpoint of a
straight run (checkpoints are atomic, so this is what a run killed after writing it resumes from)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tsm.config import Config, config_from_dict
from tsm.errors import TsmError
from tsm.inject import expert_layers
from tsm.recipes.base import expert_modules
from tsm.recipes.run import train

FILES = ("unet", "text_encoder")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tsm.bench.digits_data import write_folder

    return write_folder(tmp_path_factory.mktemp("variants") / "digits", "source", n=8)


def make_config(
    data: Path, out: Path, optim: dict | None = None, experts: dict | None = None, **train
) -> Config:
    """Foster 3 experts (scales [2, 1]) of the denoiser and the text encoder, 4 steps of batch 4."""
    return config_from_dict(
        {
            "model": {"family": "digits"},
            "experts": {"scales": [2, 1], "rank": 2, **(experts or {})},
            "data": {"path": str(data), "resolution": 8, "cache": False},
            "optim": {"lr": 1e-2, **(optim or {})},
            "train": {
                "method": "foster",
                "steps": 4,
                "batch_size": 4,
                "checkpoint_every": 1,
                "keep_last": 9,
                "validation_prompts": [],
                "log_with": "none",
                "output_dir": str(out),
                **train,
            },
        }
    )


SHARED = {
    "shared_rank": 1
}  # the assembling tests' experts: with a shared full-range expert, which trains too


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in FILES for k, v in load_file(run / f"{name}.safetensors").items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def resumed_from(cfg: Config, run: Path, step: int, out: Path) -> dict[str, torch.Tensor]:
    """The final adapters of ``run`` redone from its checkpoint at ``step`` (later ones and results gone)."""
    shutil.copytree(run, out)
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    for name in FILES:
        (out / f"{name}.safetensors").unlink()
    cfg.train.output_dir = str(out)
    summary = train(cfg, resume=True, progress=False)
    assert summary["start"] == step
    return adapters(out)


@pytest.fixture(scope="module")
def fostered(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fostered") / "run"
    train(make_config(data, run, experts=SHARED, steps=2), progress=False)
    return run


def recipes(*cfgs: Config) -> list:
    """In-process recipes of the configs, sharing one Accelerator (accelerate's state is global)."""
    from tsm.data import load_dataset
    from tsm.recipes.run import build, make_accelerator, recipe_class

    acc = make_accelerator(cfgs[0], Path(cfgs[0].train.output_dir))
    out = []
    for cfg in cfgs:
        c = build(cfg, acc.device, torch.float32)
        dataset = load_dataset(cfg.data, video=False, seed=cfg.train.seed)
        out.append(recipe_class(cfg.train.method)(cfg, c, dataset, None, acc))
    return out


def layers(recipe) -> list:
    """(module name, layer name, layer) of every expert layer of a recipe."""
    return [(m, n, layer) for m, mod in expert_modules(recipe.c).items() for n, layer in expert_layers(mod)]


# ---------------------------------------------------------------------------------------------------------
def test_the_keys_at_their_defaults_change_nothing(data, tmp_path, fostered):
    cfg = make_config(
        data, tmp_path / "keys", experts=SHARED, steps=2, warm_start_fraction=0.0, assemble_experts_lr=None
    )
    train(cfg, progress=False)
    assert_identical(adapters(tmp_path / "keys"), adapters(fostered))
    runs = {}
    for name, extra in {
        "plain": {},
        "keys": {"assemble_experts_lr": None, "warm_start_fraction": 0.0},
    }.items():
        runs[name] = tmp_path / f"assemble_{name}"
        cfg = make_config(
            data, runs[name], experts=SHARED, steps=2, method="assemble", experts_from=str(fostered), **extra
        )
        train(cfg, progress=False)
    assert_identical(adapters(runs["plain"]), adapters(runs["keys"]))


def test_bad_values_are_one_line_errors(data, tmp_path):
    bad = {
        "must be in [0, 1)": {"warm_start_fraction": 1.0},
        "gives 0 warm steps": {"warm_start_fraction": 0.1},  # of 4 steps
        "gives 4 warm steps": {"warm_start_fraction": 0.9},
        "needs train.method=foster": {"warm_start_fraction": 0.5, "method": "lora"},
        "no only_expert": {"warm_start_fraction": 0.5, "only_expert": [0, 1]},
        "applies to train.method=assemble": {"assemble_experts_lr": 1e-4},
        "must be > 0": {"assemble_experts_lr": 0.0, "method": "assemble", "experts_from": "x"},
    }
    for words, train_keys in bad.items():
        with pytest.raises(TsmError, match=words.replace("[", r"\[").replace(")", r"\)")) as e:
            make_config(data, tmp_path, **train_keys)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------------------------
def test_the_warm_phase_trains_one_lora_then_every_expert_starts_from_it(data, tmp_path):
    """Two warm steps of foster equal two steps of plain LoRA from the same weights (gradients and values);
    at the switch every expert of every scale becomes that LoRA, with no optimizer state; then they part."""
    warm_cfg = make_config(data, tmp_path / "warm", batch_size=8, warm_start_fraction=0.5)
    lora_cfg = make_config(data, tmp_path / "lora", batch_size=8, method="lora")
    warm, lora = recipes(warm_cfg, lora_cfg)
    assert warm.warm_steps == 2
    plain = {(m, n): layer for m, n, layer in layers(lora)}
    with torch.no_grad():  # the same start: the plain LoRA's weights in the warm expert s0_i0
        for m, n, layer in layers(warm):
            layer.lora_A["s0_i0"].copy_(plain[m, n].lora_A["s0_i0"])
            layer.lora_B["s0_i0"].copy_(plain[m, n].lora_B["s0_i0"])
    untouched = {
        (m, n, k): layer.lora_A[k].detach().clone() for m, n, layer in layers(warm) for k in layer.keys
    }
    for step in range(2):
        for recipe in (warm, lora):
            recipe.begin(step)
            recipe.step(step)
        for m, n, layer in layers(warm):
            for bank, other in ((layer.lora_A, plain[m, n].lora_A), (layer.lora_B, plain[m, n].lora_B)):
                assert torch.equal(bank["s0_i0"].grad, other["s0_i0"].grad), (m, n)
                assert torch.equal(bank["s0_i0"], other["s0_i0"]), (m, n)
                assert all(bank[k].grad is None for k in layer.keys[1:])  # no sample reached them
            assert all(torch.equal(layer.lora_A[k], untouched[m, n, k]) for k in layer.keys[1:])
    assert any(layer.lora_B["s0_i0"].abs().sum() > 0 for _, _, layer in layers(warm))  # it trained

    warm.begin(2)  # the switch
    assert not warm.warm_hooks and len(warm.opt.state) == 0
    for m, n, layer in layers(warm):
        for bank, other in ((layer.lora_A, plain[m, n].lora_A), (layer.lora_B, plain[m, n].lora_B)):
            for k in layer.keys:
                assert torch.equal(bank[k], other["s0_i0"]), (m, n, k)
    lrs = []
    for step in (2, 3):
        warm.begin(step)
        lrs.append(warm.step(step)["lr"])
    assert lrs == [1e-2, 1e-2]  # the schedule continues (constant here)
    for m, n, layer in layers(warm):
        bs = [layer.lora_B[k] for k in layer.keys]  # s0_i0, s0_i1 (the two halves of t), s1_i0 (all t)
        assert all(not torch.equal(x, y) for i, x in enumerate(bs) for y in bs[i + 1 :]), (m, n)


def test_warm_start_with_smooth_routing_and_a_shared_expert(data, tmp_path):
    """Smooth routing blends no second expert in the warm phase; the shared expert trains alongside the warm
    LoRA, is not overwritten at the switch and keeps its optimizer state (the warm expert's is dropped)."""
    experts = {"routing": "smooth", "shared_rank": 1}
    (warm,) = recipes(make_config(data, tmp_path / "w", None, experts, batch_size=8, warm_start_fraction=0.5))
    for step in range(2):
        warm.begin(step)
        warm.step(step)
    for _, _, layer in layers(warm):
        assert all(layer.lora_A[k].grad is None for k in layer.keys[1:])  # no blend partner, no other scale
        assert layer.lora_A["s0_i0"].grad is not None and layer.shared_A.grad is not None
    shared = {id(layer): layer.shared_B.detach().clone() for _, _, layer in layers(warm)}
    assert any(v.abs().sum() > 0 for v in shared.values())
    warm.begin(2)
    for _, _, layer in layers(warm):
        assert all(torch.equal(layer.lora_B[k], layer.lora_B["s0_i0"]) for k in layer.keys)
        assert torch.equal(layer.shared_B, shared[id(layer)])
        assert layer.lora_A["s0_i0"] not in warm.opt.state and layer.shared_A in warm.opt.state
    warm.begin(2)
    warm.step(2)  # smooth routing blends the (now equal) experts again
    assert any(layer.lora_A["s0_i1"].grad is not None for _, _, layer in layers(warm))


def test_warm_start_changes_the_run_and_resumes_bit_identically_across_the_switch(data, tmp_path):
    """Stopped before, at and after the switch (step 2 of 4), resumed runs end with the straight run's
    weights (and EMA: the experts' averages also restart from the warm LoRA's)."""
    optim = {"ema_decay": 0.5}
    cold = tmp_path / "cold"
    train(make_config(data, cold, optim), progress=False)
    straight = tmp_path / "straight"
    summary = train(make_config(data, straight, optim, warm_start_fraction=0.5), progress=False)
    assert summary["steps"] == 4  # the same steps (and samples) as the run without warm start
    final = adapters(straight)
    assert any(not torch.equal(final[k], v) for k, v in adapters(cold).items())
    for step in (1, 2, 3):
        cfg = make_config(data, straight, optim, warm_start_fraction=0.5)
        assert_identical(resumed_from(cfg, straight, step, tmp_path / f"from_{step}"), final)


# ---------------------------------------------------------------------------------------------------------
# joint assembling
# ---------------------------------------------------------------------------------------------------------
def test_joint_assembling_groups_gradients_and_clipping(data, tmp_path, fostered):
    """The routers at optim.lr, the experts in their own groups at assemble_experts_lr; the experts get
    gradients, each clipped on its own; with the key unset they stay frozen and out of the optimizer."""
    common = {"method": "assemble", "experts_from": str(fostered)}
    optim = {"lr": 1e-3, "max_grad_norm": 1e-4}
    joint_cfg = make_config(data, tmp_path / "joint", optim, SHARED, assemble_experts_lr=1e-4, **common)
    frozen_cfg = make_config(data, tmp_path / "frozen", optim, SHARED, **common)
    joint, frozen = recipes(joint_cfg, frozen_cfg)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    routers = [p for _, _, layer in layers(joint) for p in layer.router.parameters()]
    experts = [p for _, _, layer in layers(joint) for p in layer.expert_params()]  # routed and shared
    groups = joint.opt.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-4, 1e-4]  # unet, text encoder routers; their experts
    assert ids(p for g in groups[:2] for p in g["params"]) == ids(routers)
    assert ids(p for g in groups[2:] for p in g["params"]) == ids(experts)
    assert all(p.requires_grad for p in experts)
    assert [g["lr"] for g in frozen.opt.param_groups] == [1e-3, 1e-3]

    before = {id(p): p.detach().clone() for p in experts}
    for step in range(2):
        joint.begin(step)
        out = joint.step(step)
    assert out["lr"] == 1e-3 and joint.sched.get_last_lr() == [1e-3, 1e-3, 1e-4, 1e-4]
    from tsm.inject import get_routing

    for module in expert_modules(joint.c).values():
        keys = get_routing(module).spec.expert_keys()
        norms = {}
        for _, layer in expert_layers(module):
            pairs = [(k, (layer.lora_A[k], layer.lora_B[k])) for k in keys]
            for k, params in [*pairs, ("shared", (layer.shared_A, layer.shared_B))]:
                for p in params:
                    assert p.grad is not None  # core, context and shared experts are in the forward
                    norms[k] = norms.get(k, 0.0) + float(p.grad.square().sum())
        assert all(v**0.5 <= 1e-4 * (1 + 1e-5) for v in norms.values()), norms  # each clipped on its own
        assert max(norms.values()) ** 0.5 > 0.9e-4  # and the clip bit
    assert all(not torch.equal(p, before[id(p)]) for p in experts if p.grad.abs().sum() > 0)

    frozen_experts = [p for _, _, layer in layers(frozen) for p in layer.expert_params()]
    snapshot = [p.detach().clone() for p in frozen_experts]
    frozen.begin(0)
    frozen.step(0)
    assert all(p.grad is None and torch.equal(p, s) for p, s in zip(frozen_experts, snapshot, strict=True))


def test_experts_change_in_assemble_iff_their_lr_is_set_and_resume_is_bit_identical(data, tmp_path, fostered):
    common = {"method": "assemble", "experts_from": str(fostered)}
    start = adapters(fostered)
    runs = {"frozen": {}, "joint": {"assemble_experts_lr": 1e-3}}
    ends = {}
    for name, extra in runs.items():
        train(make_config(data, tmp_path / name, experts=SHARED, **common, **extra), progress=False)
        ends[name] = adapters(tmp_path / name)
        for k, v in start.items():
            if ".router." in k:
                assert not torch.equal(ends[name][k], v), (name, k)  # the routers trained in both
    experts = [k for k in start if ".router." not in k]
    assert experts and all(torch.equal(ends["frozen"][k], start[k]) for k in experts)
    moved = [k for k in experts if ".lora_B.s0_" in k or "shared_B" in k]  # the core and shared experts
    assert any("shared_B" in k for k in moved) and all(
        not torch.equal(ends["joint"][k], start[k]) for k in moved
    )
    cfg = make_config(data, tmp_path / "joint", experts=SHARED, **common, **runs["joint"])
    assert_identical(resumed_from(cfg, tmp_path / "joint", 2, tmp_path / "resumed"), ends["joint"])


# ---------------------------------------------------------------------------------------------------------
# the layer variants through the run loop
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experts", [{"shared_rank": 2}, {"routing": "smooth"}], ids=["shared", "smooth"])
def test_layer_variants_train_and_resume_bit_identically(data, tmp_path, experts):
    """A fostering run with a shared expert or smooth routing differs from faithful TSM's, and a run resumed
    from its step-2 checkpoint ends with the straight run's weights."""
    faithful = tmp_path / "faithful"
    train(make_config(data, faithful), progress=False)
    straight = tmp_path / "straight"
    train(make_config(data, straight, experts=experts), progress=False)
    final = adapters(straight)
    if "shared_rank" in experts:  # the shared expert is saved with the others, and it trained
        shared = [k for k in final if "shared" in k]
        assert shared and any(final[k].abs().sum() > 0 for k in shared if "B" in k)
    common = final.keys() & adapters(faithful).keys()
    assert any(not torch.equal(final[k], adapters(faithful)[k]) for k in common)
    cfg = make_config(data, straight, experts=experts)
    assert_identical(resumed_from(cfg, straight, 2, tmp_path / "resumed"), final)
