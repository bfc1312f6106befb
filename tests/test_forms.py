"""One LoRA whose rank channels vary with t: the modulated bottleneck dW(t) = s B diag(1 + g(t)) A
(``modulation="table"``) and T-LoRA's rank schedule (``rank_schedule="tlora"``). Each starts as the plain LoRA,
merges at sampling, saves, exports a step as a diffusers LoRA and resumes bit-identically."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_experts import Net, make_input
from test_io import denoise, tiny_pipeline, tiny_unet
from test_variant_recipes import adapters, assert_identical, data, make_config, resumed_from  # noqa: F401
from test_variants import stand_in_components

import tsm
from tsm.config import Config, ExpertsConfig, TrainConfig, validate
from tsm.experts import ExpertLayer, StepKey
from tsm.recipes.run import train

FORMS = {
    "table": dict(modulation="table", modulation_bins=10),
    "tlora": dict(rank_schedule="tlora", min_rank=1),
    "table+tlora": dict(modulation="table", modulation_bins=10, rank_schedule="tlora", min_rank=2),
}
KINDS = ["linear", "conv2d"]


def pair(kind: str, rank: int = 4, **form) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain LoRA, the form) on the same base with the same A and a shared non-zero B."""
    torch.manual_seed(0)
    base = Net(kind)
    models = []
    for kw in ({}, form):
        torch.manual_seed(1)
        spec = tsm.ExpertSpec(scales=(1,), rank=rank, targets=["a", "b"], **kw)
        models.append(tsm.add_experts(copy.deepcopy(base), spec))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("a", "b"):
            b = torch.randn(getattr(models[0], name).lora_B["s0_i0"].shape, generator=g) * 0.3
            for model in models:
                getattr(model, name).lora_B["s0_i0"].copy_(b)
    return models[0], models[1]


def randomize_tables(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            if layer.modulation is not None:
                layer.modulation.copy_(torch.randn(layer.modulation.shape, generator=g) * 0.5)


# ---------------------------------------------------------------------------------------------------------
# spec and config
# ---------------------------------------------------------------------------------------------------------
def test_spec_fields_validate_and_default_json_is_unchanged():
    plain = tsm.ExpertSpec(scales=(1,))
    for key in ("modulation", "modulation_bins", "rank_schedule", "min_rank"):
        assert key not in plain.to_json()
    spec = tsm.ExpertSpec(
        scales=(1,), rank=8, modulation="table", modulation_bins=7, rank_schedule="tlora", min_rank=3
    )
    assert tsm.ExpertSpec.from_json(spec.to_json()) == spec and spec.varies_in_rank
    bad = {
        "modulation must be one of none, table": dict(modulation="film"),
        "rank_schedule must be one of none, tlora": dict(rank_schedule="linear"),
        r"modulation_bins must be an int in \[1, 1000\]": dict(modulation_bins=0),
        r"min_rank must be an int in \[1, rank=4\]": dict(min_rank=5),
    }
    for match, kw in bad.items():
        with pytest.raises(tsm.TsmError, match=match):
            tsm.ExpertSpec(scales=(1,), **kw)
    for kw in (dict(scales=(4,)), dict(scales=(1,), shared_rank=2)):
        with pytest.raises(tsm.TsmError, match="use scales \\[1\\] with no shared_rank"):
            tsm.ExpertSpec(**kw, modulation="table")


def test_config_keys_validate_and_reach_the_expert_specs():
    from tsm.recipes.run import expert_specs

    for bad, match in (
        (dict(modulation="x"), "experts.modulation must be"),
        (dict(rank_schedule="x"), "experts.rank_schedule must be"),
        (dict(modulation_bins=0), "experts.modulation_bins must be"),
        (dict(min_rank=9), "experts.min_rank must be in"),
        (dict(modulation="table", scales=[4]), "use train.method=lora"),
    ):
        with pytest.raises(tsm.TsmError, match=match):
            validate(Config(experts=ExpertsConfig(**bad), train=TrainConfig(method="foster")))
    c = stand_in_components()
    experts = ExpertsConfig(rank=4, modulation="table", modulation_bins=5, rank_schedule="tlora", min_rank=2)
    cfg = Config(experts=experts, train=TrainConfig(method="lora"))
    validate(cfg)
    spec = expert_specs(cfg, c)["unet"]
    assert (spec.modulation, spec.modulation_bins, spec.rank_schedule, spec.min_rank) == (
        "table",
        5,
        "tlora",
        2,
    )
    layer = tsm.add_experts(Net(), spec).a
    assert torch.equal(layer.modulation, torch.zeros(5, 4)) and layer.min_rank == 2
    default = expert_specs(Config(train=TrainConfig(method="lora")), c)["unet"]
    assert not default.varies_in_rank and tsm.add_experts(Net(), default).a.modulation is None


# ---------------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_table_equals_the_plain_lora_bitwise(kind):
    """g = 0 (and a schedule that keeps every rank on) gives exactly the plain LoRA's output, mixed-t batches,
    merged and unmerged; the table is then a trained parameter."""
    for form in (dict(modulation="table"), dict(rank_schedule="tlora", min_rank=4)):
        plain, model = pair(kind, **form)
        x = make_input(kind, 4, torch.Generator().manual_seed(0))
        t = torch.tensor([0.0, 250.0, 600.0, 999.0])
        for m in (plain, model):
            m.train()
        assert torch.equal(model(x, t), plain(x, t))
        with tsm.experts_off(plain):
            assert not torch.allclose(plain(x, t), model(x, t), atol=1e-3)  # B is not zero
        plain.eval(), model.eval()
        with torch.no_grad():
            for tt in (0.0, 999.0):
                assert torch.equal(model(x, torch.tensor(tt)), plain(x, torch.tensor(tt)))
        assert isinstance(model.a.merged, StepKey) and plain.a.merged == 0
    model = pair(kind, modulation="table")[1]
    assert any(p is model.a.modulation for p in tsm.adapter_params(model))


def test_layer_math_by_hand():
    """y = base(x) + s B diag((1 + g[floor(t bins / T)]) * [k < r(t)]) A x, one linear layer, three samples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    spec = tsm.ExpertSpec(
        scales=(1,),
        rank=4,
        alpha=8,
        targets=["0"],
        modulation="table",
        modulation_bins=4,
        rank_schedule="tlora",
    )
    tsm.add_experts(model, spec)
    layer: ExpertLayer = model[0]
    with torch.no_grad():
        layer.lora_B["s0_i0"].normal_()
        layer.modulation.normal_()
    x = torch.randn(3, 2, 6)
    t = torch.tensor([0, 300, 999])  # bins 0, 1, 3; active ranks 4, floor(3 * 0.7) + 1 = 3, 1
    tsm.set_timesteps(model, t)
    a, b, g = layer.lora_A["s0_i0"], layer.lora_B["s0_i0"], layer.modulation
    want = layer.base_layer(x)
    for i, (row, rank) in enumerate([(0, 4), (1, 3), (3, 1)]):
        d = (1 + g[row]) * (torch.arange(4) < rank)
        want[i] += 2.0 * F.linear(F.linear(x[i], a) * d, b)
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    assert layer.active_rank(t).tolist() == [4, 3, 1]


def test_tlora_keeps_only_min_rank_ranks_at_high_noise():
    """r = 16, r_min = 2: at t near T the update is that of the LoRA cut to its first 2 ranks; at t = 0 the
    whole LoRA's; and r(t) falls as floor(14 (T - t) / T) + 2."""
    _, model = pair("linear", rank=16, rank_schedule="tlora", min_rank=2)
    cut, _ = pair("linear", rank=2)
    full, _ = pair("linear", rank=16)
    with torch.no_grad():
        for name in ("a", "b"):
            for src, dst in ((model, full), (model, cut)):
                r = getattr(dst, name).lora_A["s0_i0"].shape[0]
                getattr(dst, name).lora_A["s0_i0"].copy_(getattr(src, name).lora_A["s0_i0"][:r])
                getattr(dst, name).lora_B["s0_i0"].copy_(getattr(src, name).lora_B["s0_i0"][:, :r])
                getattr(dst, name).scaling = getattr(model, name).scaling  # the same s = alpha / 16
    x = make_input("linear", 2, torch.Generator().manual_seed(0))
    high = torch.tensor([950.0, 999.0])
    torch.testing.assert_close(model(x, high), cut(x, high), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(model(x, high), full(x, high), atol=1e-3)
    low = torch.zeros(2)
    torch.testing.assert_close(model(x, low), full(x, low), atol=1e-6, rtol=1e-6)
    ranks = model.a.active_rank(torch.tensor([0, 1, 72, 500, 928, 929, 999]))
    assert ranks.tolist() == [16, 15, 14, 9, 3, 2, 2]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_t_batch_equals_each_sample_alone(form, kind):
    _, model = pair(kind, **FORMS[form])
    randomize_tables(model)
    x = make_input(kind, 5, torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 140.0, 999.0, 600.0, 130.0])
    for train_mode in (True, False):
        model.train(train_mode)
        alone = torch.cat([model(x[b : b + 1], t[b : b + 1]) for b in range(5)])
        torch.testing.assert_close(model(x, t), alone, atol=5e-6, rtol=1e-5)


def test_the_table_learns_only_the_rows_of_the_batch():
    _, model = pair("linear", modulation="table", modulation_bins=10)
    model.train()
    x = make_input("linear", 3, torch.Generator().manual_seed(0))
    model(x, torch.tensor([5.0, 95.0, 730.0])).square().mean().backward()  # rows 0, 0, 7
    grad = model.a.modulation.grad
    assert [i for i in range(10) if grad[i].abs().sum() > 0] == [0, 7]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_and_merges_once_per_factor(form, kind, monkeypatch):
    _, model = pair(kind, **FORMS[form])
    randomize_tables(model)
    model.eval()
    w0 = model.a.base_layer.weight.detach().clone()
    x = make_input(kind, 2, torch.Generator().manual_seed(0))
    merges = []
    original = ExpertLayer._merge_terms

    def counting(layer, key):
        merges.append(key)
        return original(layer, key)

    schedule = [999.0, 960.0, 940.0, 700.0, 650.0, 300.0, 10.0, 0.0]
    want = []
    with torch.enable_grad():
        want = [model(x, torch.tensor(t)) for t in schedule]
    monkeypatch.setattr(ExpertLayer, "_merge_terms", counting)
    keys = []
    with torch.no_grad():  # a sampler's loop: one t per call, autograd off
        for t, unmerged in zip(schedule, want, strict=True):
            torch.testing.assert_close(model(x, torch.tensor(t)), unmerged, atol=1e-5, rtol=1e-5)
            keys.append(model.a.merged)
    # a merge (in both layers) only where d(t) changes: a new table row or active rank
    changes = 1 + sum(k != j for k, j in zip(keys, keys[1:], strict=False))
    assert all(isinstance(k, StepKey) for k in keys) and 1 < changes < len(schedule)
    assert len(merges) == 2 * changes
    tsm.unmerge_all(model)
    assert torch.equal(model.a.base_layer.weight, w0)


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------
def _unet_with(**form):
    base = tiny_unet()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    tsm.add_experts(model, tsm.ExpertSpec(scales=(1,), rank=4, alpha=4, **form))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            layer.lora_B["s0_i0"].copy_(0.2 * torch.randn(layer.lora_B["s0_i0"].shape, generator=g))
    randomize_tables(model)
    return base, model.eval()


def test_save_load_roundtrip_keeps_the_table(tmp_path):
    form = FORMS["table+tlora"]
    _, model = _unet_with(**form)
    path = tsm.save(model, tmp_path / "experts.safetensors")
    assert any(k.endswith(".modulation") for k in load_file(path))
    _, other = _unet_with(**form)
    with torch.no_grad():
        for p in tsm.adapter_params(other):
            p.zero_()
    tsm.load(other, path)
    assert torch.equal(denoise(other, 300), denoise(model, 300))
    _, plain = _unet_with()
    with pytest.raises(tsm.TsmError, match="modulation table != none"):
        tsm.load(plain, path)


@pytest.mark.parametrize("form", ["table", "table+tlora"])
def test_export_step_lora_is_the_model_at_that_step_in_diffusers(tmp_path, form):
    base, model = _unet_with(**FORMS[form])
    t = 700
    path = tsm.io.export_step_lora(model, t, tmp_path / "step.safetensors")
    assert {v.shape[0] for k, v in load_file(path).items() if k.endswith("lora_A.weight")} == {4}
    pipe = tiny_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(path)
    want = denoise(model, t)
    torch.testing.assert_close(denoise(pipe.unet, t), want, rtol=1e-5, atol=5e-5)
    assert not torch.allclose(denoise(pipe.unet, t), denoise(base, t), atol=1e-3)
    assert not torch.allclose(denoise(pipe.unet, t), denoise(model, 100), atol=1e-4)  # another bin's step


@pytest.mark.parametrize("form", ["table", "tlora"])
def test_one_file_per_interval_is_refused_for_a_form_that_varies_within_it(tmp_path, form):
    _, model = _unet_with(**FORMS[form])
    for export in (
        lambda: tsm.export_lora(model, tmp_path / "e.safetensors", scale=0, index=0),
        lambda: tsm.io.export_all_lora(model, tmp_path / "all"),
    ):
        with pytest.raises(tsm.TsmError, match="a different LoRA at every t; export the LoRA of each"):
            export()
    assert not list(tmp_path.rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# through `tsm train`
# ---------------------------------------------------------------------------------------------------------
def test_modulated_lora_trains_its_table_and_resumes_bit_identically(data, tmp_path):  # noqa: F811
    form = {"rank": 2, "modulation": "table", "modulation_bins": 4, "rank_schedule": "tlora"}
    plain = tmp_path / "plain"
    train(make_config(data, plain, method="lora", experts={"scales": [1]}), progress=False)
    straight = tmp_path / "straight"
    cfg = make_config(data, straight, method="lora", experts={"scales": [1], **form})
    train(cfg, progress=False)
    final = adapters(straight)
    tables = [k for k in final if k.endswith(".modulation")]
    assert tables and any(final[k].abs().sum() > 0 for k in tables)
    common = final.keys() & adapters(plain).keys()
    assert any(not torch.equal(final[k], adapters(plain)[k]) for k in common)
    cfg = make_config(data, straight, method="lora", experts={"scales": [1], **form})
    assert_identical(resumed_from(cfg, straight, 2, tmp_path / "resumed"), final)


# ---------------------------------------------------------------------------------------------------------
# steps scaled by each expert's share of a mixed batch (train.share_scaled_lr)
# ---------------------------------------------------------------------------------------------------------
def test_share_factors_by_hand():
    from tsm.recipes.lora_foster import share_factors

    spec = tsm.ExpertSpec(scales=(4,))
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    assert share_factors(ids, torch.zeros(8, dtype=torch.long), spec) == {0: 1.5, 1: 0.5, 2: 1.0, 3: 1.0}
    # scales (2, 1): samples alternate scales; expert 2 (full range) gets every scale-1 sample: factor 1;
    # scale 0's 4 samples: 3 in expert 0, 1 in expert 1 -> 3 / 2 and 1 / 2; an expert with no sample: none
    spec = tsm.ExpertSpec(scales=(2, 1))
    ids = torch.tensor([0, 2, 0, 2, 0, 2, 1, 2])
    assert share_factors(ids, torch.arange(8) % 2, spec) == {0: 1.5, 1: 0.5, 2: 1.0}
    assert share_factors(torch.tensor([1, 1, 2, 2]), torch.arange(4) % 2, spec) == {1: 2.0, 2: 1.0}


def test_share_scaled_steps_are_the_plain_steps_times_each_experts_factor(data, tmp_path):  # noqa: F811
    from test_variant_recipes import recipes

    from tsm.recipes.lora_foster import share_factors

    four = {"scales": [4]}  # 4 experts on a batch of 8: uneven shares
    runs = {}
    for name, on in (("plain", False), ("scaled", True)):
        runs[name] = tmp_path / name
        cfg = make_config(data, runs[name], experts=four, steps=1, batch_size=8, share_scaled_lr=on)
        train(cfg, progress=False)
    plain, scaled = adapters(runs["plain"]), adapters(runs["scaled"])
    (recipe,) = recipes(make_config(data, tmp_path / "draws", experts=four, steps=1, batch_size=8))
    draws, _ = recipe.draws(0)
    factors = share_factors(
        recipe.expert_ids(draws["t"], draws["scales"]), draws["scales"], recipe.routing.spec
    )
    assert len(set(factors.values())) > 1  # the step's draws are uneven: a check that can fail
    keys = tsm.ExpertSpec(scales=(4,)).expert_keys()
    checked = 0
    for k, v in plain.items():
        if ".lora_B." in k:  # B starts at 0: the final B is the first step itself
            c = factors.get(keys.index(k.rsplit(".", 1)[1]), 1.0)
            torch.testing.assert_close(scaled[k], c * v, rtol=1e-6, atol=0)
            checked += 1
    assert checked > 0
    with pytest.raises(tsm.TsmError, match="train.share_scaled_lr scales each expert's step"):
        validate(Config(train=TrainConfig(method="foster", batch_per_expert=True, share_scaled_lr=True)))


def test_share_scaled_run_resumes_bit_identically(data, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    train(make_config(data, straight, share_scaled_lr=True), progress=False)
    cfg = make_config(data, straight, share_scaled_lr=True)
    assert_identical(resumed_from(cfg, straight, 2, tmp_path / "resumed"), adapters(straight))


# ---------------------------------------------------------------------------------------------------------
# the digits benchmark's rows
# ---------------------------------------------------------------------------------------------------------
def test_digits_rows_of_the_forms_are_full_mode_only_and_set_their_keys(tmp_path):
    from tsm.bench.digits import Budget, comparisons, row_config, rows_for

    full = {r.name: r for r in rows_for("domain", True, 0)}
    assert "LoRA r=16 modulated, 4x steps" not in {r.name for r in rows_for("domain", False, 0)}
    budget = Budget(steps=8, assemble_steps=4)
    for name, key, value in (
        ("LoRA r=16 modulated, 4x steps", "modulation", "table"),
        ("T-LoRA r=16, 4x steps", "rank_schedule", "tlora"),
    ):
        cfg = row_config(full[name], budget, tmp_path, tmp_path / "run")
        assert getattr(cfg.experts, key) == value and cfg.train.method == "lora"
        assert (cfg.experts.rank, cfg.train.steps) == (16, 32)  # LoRA r=16 at 4x steps: its twin's
        assert comparisons(name) == {"same LoRA, equal compute": "LoRA r=16, 4x steps"}
    plain = row_config(full["LoRA r=16, 4x steps"], budget, tmp_path, tmp_path / "run")
    assert (plain.experts.modulation, plain.experts.rank_schedule) == ("none", "none")
