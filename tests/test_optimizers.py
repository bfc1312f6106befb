"""`optim.name`: each optimizer as built from the config (class and values), one step of each equal to the
library's own optimizer stepped by hand, every prodigy key changing the step, the one-line errors, and a
`tsm train` run stopped after a checkpoint and resumed giving the uninterrupted run's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers.optimization import Adafactor

import tsm.optimizers
from tsm.config import OPTIMIZERS, OptimConfig, config_from_dict
from tsm.errors import TsmError
from tsm.optimizers import build_optimizer

PRODIGY = "prodigyopt is optional (pip install 'tsm[prodigy]')"


def toy_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))


def run_steps(opt: torch.optim.Optimizer, p: torch.nn.Parameter, steps: int = 3) -> torch.Tensor:
    """``steps`` updates on a fixed quadratic, (p - target)^2 summed; the parameter after them."""
    target = torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape)
    for _ in range(steps):
        opt.zero_grad()
        (p - target).square().sum().backward()
        opt.step()
    return p.detach().clone()


def built(optim: OptimConfig, steps: int = 3) -> torch.Tensor:
    p = toy_param()
    return run_steps(build_optimizer(optim, [{"params": [p]}]), p, steps)


# ---------------------------------------------------------------------------------------------------------
# class and hyperparameters as built from the config
# ---------------------------------------------------------------------------------------------------------
def test_the_default_is_adamw_with_the_groups_own_lr_and_weight_decay():
    assert OptimConfig().name == "adamw" and OPTIMIZERS == ("adamw", "adamw8bit", "prodigy", "adafactor")
    optim = OptimConfig(lr=3e-4, weight_decay=0.05, betas=[0.8, 0.95], eps=1e-6)
    a, b = toy_param(), toy_param()
    opt = build_optimizer(optim, [{"params": [a]}, {"params": [b], "lr": 1e-5, "weight_decay": 0.0}])
    assert type(opt) is torch.optim.AdamW
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["weight_decay"], g0["betas"], g0["eps"]) == (3e-4, 0.05, (0.8, 0.95), 1e-6)
    assert (g1["lr"], g1["weight_decay"], g1["betas"]) == (1e-5, 0.0, (0.8, 0.95))
    assert g0["fused"] is None and build_optimizer(optim, [{"params": [a]}], fused=True).defaults["fused"]


def test_prodigy_is_built_with_its_keys():
    prodigyopt = pytest.importorskip("prodigyopt", reason=PRODIGY)
    d = OptimConfig()
    assert (d.prodigy_d_coef, d.prodigy_use_bias_correction, d.prodigy_safeguard_warmup) == (1.0, True, True)
    assert (d.prodigy_beta3, d.prodigy_decouple) == (None, True)
    optim = OptimConfig(
        name="prodigy", lr=1.0, weight_decay=0.01, betas=[0.9, 0.99], eps=1e-7, prodigy_d_coef=2.0,
        prodigy_use_bias_correction=False, prodigy_safeguard_warmup=False, prodigy_beta3=0.98,
        prodigy_decouple=False,
    )  # fmt: skip
    opt = build_optimizer(optim, [{"params": [toy_param()]}])
    assert type(opt) is prodigyopt.Prodigy
    (g,) = opt.param_groups
    want = {"lr": 1.0, "weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-7, "d_coef": 2.0}
    want |= {"use_bias_correction": False, "safeguard_warmup": False, "beta3": 0.98, "decouple": False}
    assert {k: g[k] for k in want} == want


def test_adafactor_uses_the_lr_and_ignores_betas_and_eps():
    optim = OptimConfig(name="adafactor", lr=2e-3, weight_decay=0.02)
    opt = build_optimizer(optim, [{"params": [toy_param()]}])
    assert type(opt) is Adafactor
    (g,) = opt.param_groups
    assert (g["lr"], g["weight_decay"], g["eps"], g["beta1"]) == (2e-3, 0.02, (1e-30, 1e-3), None)
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (False, False, False)
    assert "betas" not in g
    odd = OptimConfig(name="adafactor", lr=2e-3, weight_decay=0.02, betas=[0.5, 0.6], eps=1e-3)
    assert torch.equal(built(optim), built(odd))  # as the field comments say
    assert not torch.equal(built(optim), built(OptimConfig(name="adafactor", lr=4e-3, weight_decay=0.02)))


# ---------------------------------------------------------------------------------------------------------
# one step (three) equals the library's optimizer stepped by hand
# ---------------------------------------------------------------------------------------------------------
def reference(name: str, p: torch.nn.Parameter) -> torch.optim.Optimizer:
    """The library's optimizer built by hand with the settings `reference_config` describes."""
    if name == "adamw":
        return torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(
            [p], lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, d_coef=1.5,
            use_bias_correction=True, safeguard_warmup=True,
        )  # fmt: skip
    return Adafactor(
        [p], lr=1e-2, weight_decay=0.1, scale_parameter=False, relative_step=False, warmup_init=False
    )


def reference_config(name: str) -> OptimConfig:
    lr = 1.0 if name == "prodigy" else 1e-2
    return OptimConfig(name=name, lr=lr, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1, prodigy_d_coef=1.5)


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_steps_equal_the_library_stepped_by_hand(name):
    if name == "prodigy":
        pytest.importorskip("prodigyopt", reason=PRODIGY)
    p = toy_param()
    want = run_steps(reference(name, p), p)
    got = built(reference_config(name))
    assert not torch.equal(got, toy_param().detach())  # it moved
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "key, value, base",
    [
        ("prodigy_d_coef", 2.0, {}),
        ("prodigy_use_bias_correction", False, {}),
        ("prodigy_safeguard_warmup", False, {}),
        ("prodigy_beta3", 0.9, {}),
        # decoupled or L2 decay tells apart once the steps are large: without bias correction d grows fast
        ("prodigy_decouple", False, {"prodigy_use_bias_correction": False}),
    ],
)
def test_every_prodigy_key_changes_the_steps(key, value, base):
    pytest.importorskip("prodigyopt", reason=PRODIGY)
    out = {}
    for name, extra in (("base", {}), ("changed", {key: value})):
        p = toy_param()
        opt = build_optimizer(
            OptimConfig(name="prodigy", lr=1.0, weight_decay=0.1, **base, **extra), [{"params": [p]}]
        )
        out[name] = run_steps(opt, p, steps=20), opt.param_groups[0]["d"]  # (the parameter, the step size d)
    (a, d_a), (b, d_b) = out["base"], out["changed"]
    assert abs(d_b / d_a - 1) > 0.05, (key, d_a, d_b)  # prodigy's estimated step size
    assert (a - b).abs().max() > 1e-6, key


# ---------------------------------------------------------------------------------------------------------
# errors: one line, what is wrong and what to do
# ---------------------------------------------------------------------------------------------------------
def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "optim, words",
    [
        ({"name": "sgd"}, ["optim.name", "adamw, adamw8bit, prodigy, adafactor", "'sgd'"]),
        ({"name": "prodigy"}, ["optim.lr=1.0", "0.0001"]),  # the default 1e-4 would barely move
        ({"name": "prodigy", "lr": 1.0, "text_lr": 1e-4}, ["optim.text_lr"]),
        ({"name": "prodigy", "lr": 1.0, "prodigy_d_coef": 0.0}, ["optim.prodigy_d_coef"]),
        ({"name": "prodigy", "lr": 1.0, "prodigy_beta3": 1.0}, ["optim.prodigy_beta3"]),
    ],
)
def test_bad_optimizer_settings_are_one_line_config_errors(optim, words):
    with pytest.raises(TsmError) as e:
        config_from_dict({"optim": optim})
    assert all(w in one_line(e) for w in words)


def test_prodigy_refuses_several_or_small_learning_rates():
    pytest.importorskip("prodigyopt", reason=PRODIGY)
    optim = OptimConfig(name="prodigy", lr=1.0)
    with pytest.raises(TsmError) as e:  # Prodigy itself would raise only at its first step
        build_optimizer(optim, [{"params": [toy_param()]}, {"params": [toy_param()], "lr": 0.5}])
    assert "one learning rate" in one_line(e) and "0.5" in str(e.value)
    with pytest.raises(TsmError) as e:  # e.g. distill.fake_lr=1e-3
        build_optimizer(optim, [{"params": [toy_param()], "lr": 1e-3}])
    assert "lr to 1.0" in one_line(e)


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` raises ImportError
    with pytest.raises(TsmError) as e:
        build_optimizer(OptimConfig(name="prodigy", lr=1.0), [{"params": [toy_param()]}])
    assert "pip install 'tsm[prodigy]'" in one_line(e)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(tsm.optimizers, "_on_cuda", lambda groups: True)  # past the GPU check
    with pytest.raises(TsmError) as e:
        build_optimizer(OptimConfig(name="adamw8bit"), [{"params": [toy_param()]}])
    assert "pip install 'tsm[bnb]'" in one_line(e)


def test_adamw8bit_without_a_gpu_says_it_needs_cuda():
    with pytest.raises(TsmError) as e:  # the parameter is on the CPU, with or without a GPU here
        build_optimizer(OptimConfig(name="adamw8bit"), [{"params": [toy_param()]}])
    assert "needs a CUDA GPU" in one_line(e) and "optim.name=adamw" in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 8-bit AdamW needs a CUDA GPU")
def test_adamw8bit_steps_equal_bitsandbytes_stepped_by_hand():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install 'tsm[bnb]')")
    optim = OptimConfig(name="adamw8bit", lr=1e-2, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1)
    # 8-bit state only for tensors of >= 4096 elements (bitsandbytes' min_8bit_size): use a 64 x 64 one
    a = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).cuda())
    b = torch.nn.Parameter(a.detach().clone())
    opt = build_optimizer(optim, [{"params": [a]}])
    assert type(opt) is bnb.optim.AdamW8bit
    want = run_steps(bnb.optim.AdamW8bit([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), b)
    torch.testing.assert_close(run_steps(opt, a), want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# every recipe builds its optimizers through build_optimizer
# ---------------------------------------------------------------------------------------------------------
def test_no_recipe_constructs_a_torch_optimizer_itself():
    import ast

    root = Path(tsm.optimizers.__file__).parent / "recipes"
    direct = [
        f"{path.name}:{n.lineno}"
        for path in sorted(root.glob("*.py"))
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call)
        and ast.unparse(n.func).startswith("torch.optim.")
        and not ast.unparse(n.func).startswith("torch.optim.lr_scheduler.")
    ]
    assert not direct, f"optimizers built outside tsm.optimizers.build_optimizer: {direct}"


def test_glance_and_distill_build_the_named_optimizer_in_both_stages():
    from tsm.models.digits import DigitsFamily
    from tsm.recipes.distill import Distiller, distill_spec
    from tsm.recipes.glance import GlanceTrainer, glance_spec, glance_timesteps

    c = DigitsFamily().load("")  # the shipped digits model
    tsm.add_experts(c.denoiser, distill_spec(rank=2, targets=["to_q"]))
    adafactor = OptimConfig(name="adafactor", lr=1e-3, betas=[0.5, 0.5])
    d = Distiller(c, fake_rank=2, fake_updates=1, resolution=8, optim=adafactor)
    assert type(d.opt) is Adafactor and type(d.fake_opt) is Adafactor
    d.assemble()
    assert type(d.opt) is Adafactor
    plain = Distiller(c, fake_rank=2, fake_updates=1, resolution=8)  # no optim: today's AdamW
    assert type(plain.opt) is torch.optim.AdamW and plain.opt.param_groups[0]["betas"] == (0.9, 0.999)

    c = DigitsFamily().load("")
    ts = glance_timesteps(c)
    tsm.add_experts(c.denoiser, glance_spec(ts["cut"], rank=2, targets=["to_q"], context=True))
    latents, prompts = torch.zeros(1, 3, 8, 8), ["digit 3"]
    g = GlanceTrainer(c, latents, prompts, ts, lr=1e-3, optim=adafactor)
    assert type(g.opt) is Adafactor and g.opt.param_groups[0]["weight_decay"] == 0.0
    g.set_stage("assemble")
    assert type(g.opt) is Adafactor


# ---------------------------------------------------------------------------------------------------------
# resume: stopped right after a checkpoint, then --resume, equals the uninterrupted run
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    from tsm.bench.digits_data import write_folder

    return write_folder(tmp_path_factory.mktemp("optim") / "digits", "source", n=8)  # 8x8, "digit 3"


def write_run_config(path: Path, data: Path, optim: dict) -> Path:
    cfg = {
        "model": {"family": "digits", "path": ""},
        "experts": {"scales": [2, 1], "rank": 2, "targets": ["to_q", "to_v"], "text_targets": []},
        "data": {"path": str(data), "resolution": 8, "cache": False},
        "optim": optim,
        "train": {
            "method": "foster", "steps": 4, "batch_size": 2, "checkpoint_every": 2, "seed": 1,
            "log_with": "none", "validation_prompts": [], "output_dir": str(path.with_suffix("")),
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


# what each optimizer keeps: proof that optim.name reached the run's recipe
STATE_KEYS = {"prodigy": "p0", "adafactor": "exp_avg_sq_row"}


RUN_OPTIM = {
    "prodigy": {"name": "prodigy", "lr": 1.0},
    "adafactor": {"name": "adafactor", "lr": 1e-3},
}


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_stopped_and_resumed_run_equals_the_straight_one(name, digits_dir, tmp_path, monkeypatch):
    if name == "prodigy":
        pytest.importorskip("prodigyopt", reason=PRODIGY)
    import tsm.recipes.run as run_module
    from tsm.cli import main

    straight = write_run_config(tmp_path / "straight.yaml", digits_dir, RUN_OPTIM[name])
    stopped = write_run_config(tmp_path / "stopped.yaml", digits_dir, RUN_OPTIM[name])
    assert main(["train", str(straight)]) == 0

    write = run_module.write_checkpoint

    def write_then_stop(run, step, *args, **kwargs):  # Ctrl-C right after the step-2 checkpoint
        out = write(run, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt
        return out

    with monkeypatch.context() as mp:
        mp.setattr(run_module, "write_checkpoint", write_then_stop)
        assert main(["train", str(stopped)]) == 130
    assert not (tmp_path / "stopped" / "unet.safetensors").exists()
    assert main(["train", str(stopped), "--resume"]) == 0

    a, b = (load_file(tmp_path / r / "unet.safetensors") for r in ("straight", "stopped"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)

    def opt_state(run: str, step: int) -> dict:
        ckpt = tmp_path / run / "checkpoints" / f"step_{step:07d}" / run_module.RECIPE_STATE
        return torch.load(ckpt, weights_only=True)["opt"]

    mid, end_a, end_b = opt_state("stopped", 2), opt_state("straight", 4), opt_state("stopped", 4)
    assert any(STATE_KEYS[name] in s for s in end_a["state"].values())  # optim.name reached the recipe
    if name == "prodigy":  # its step-size statistics move every step and are carried across the resume
        (g_mid,), (g_a,), (g_b,) = mid["param_groups"], end_a["param_groups"], end_b["param_groups"]
        keys = ("k", "d", "d_max", "d_numerator", "d_denom")
        assert [g_a[k] for k in keys] == [g_b[k] for k in keys]
        assert (g_mid["k"], g_a["k"]) == (2, 4) and 0 < g_mid["d_numerator"] < g_a["d_numerator"]
