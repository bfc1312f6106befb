"""The packaged configs train the form the long-budget benchmark chose (docs/benchmarks.md): every `*_foster`
config is shared + residual experts on mixed batches at n = 4, with the parameters of the paper's 4 experts of
rank r; its `*_paper` twin keeps the paper's form, and every other setting is the same in both."""

from dataclasses import asdict
from pathlib import Path

import pytest

from tsm.config import load_config, packaged_configs

FOSTER = sorted(n for n in packaged_configs() if n.endswith("_foster"))
# keys in which a `*_paper` config may differ from its `*_foster` twin: the form, and what the form needs
FORM_KEYS = {
    ("experts", "scales"),
    ("experts", "rank"),
    ("experts", "alpha"),
    ("experts", "shared_rank"),
    ("train", "batch_per_expert"),
    ("train", "grad_accum"),
    ("train", "output_dir"),
}


def _flat(cfg) -> dict[tuple[str, str], object]:
    return {(section, key): v for section, keys in asdict(cfg).items() for key, v in keys.items()}


def test_every_foster_config_has_a_paper_twin():
    assert len(FOSTER) == 7
    assert {n.replace("_foster", "_paper") for n in FOSTER} <= set(packaged_configs())


@pytest.mark.parametrize("name", FOSTER)
def test_foster_configs_train_shared_plus_residual_on_mixed_batches(name):
    foster = load_config(name)
    paper = load_config(name.replace("_foster", "_paper"))
    e, p = foster.experts, paper.experts
    assert foster.train.method == paper.train.method == "foster"
    assert e.scales == [4] and e.shared_rank == 4 * e.rank and e.alpha == e.rank  # s = s0 = 1, as benchmarked
    assert not foster.train.batch_per_expert  # mixed batches
    assert e.shared_rank + 4 * e.rank == 4 * p.rank  # the parameters of the paper's 4 experts of rank r
    assert len(p.scales) == 2 and p.shared_rank == 0
    # the paper's bookkeeping where the model allows it (Wan 2.2's two transformers share their samples)
    assert paper.train.batch_per_expert == (name != "wan22_foster")
    if paper.train.batch_per_expert:
        # one micro-batch of the foster config's size per expert's batch
        experts = sum(p.scales)
        assert paper.train.grad_accum == experts * foster.train.grad_accum
    assert paper.train.output_dir == f"runs/{name.replace('_foster', '_paper')}"
    differ = {k for k, v in _flat(foster).items() if _flat(paper)[k] != v}
    assert differ <= FORM_KEYS, differ - FORM_KEYS


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_baselines_hold_the_foster_configs_parameters(family):
    lora, foster = load_config(f"{family}_lora"), load_config(f"{family}_foster")
    assert lora.train.method == "lora"
    assert lora.experts.rank == foster.experts.shared_rank + 4 * foster.experts.rank == 16
    assert lora.experts.alpha == lora.experts.rank
    assert (lora.train.steps, lora.train.batch_size, lora.optim.lr) == (
        foster.train.steps,
        foster.train.batch_size,
        foster.optim.lr,
    )


def test_assembling_builds_on_the_paper_run():
    """Assembling needs coarse context experts: the paper's two scales, not the default form's one."""
    assemble, paper = load_config("sd15_assemble"), load_config("sd15_paper")
    assert assemble.train.experts_from == paper.train.output_dir
    assert assemble.experts.scales == paper.experts.scales == [8, 1]


def _train(config: str, tiny: dict[str, Path], run: Path, *more: str) -> list[str]:
    """`tsm train CONFIG` on the tiny SD1.5 folder: 16-pixel images, one step, no grid, no tracker."""
    return [
        "train", config, f"model.path={tiny['model']}", f"data.path={tiny['images']}", "data.resolution=16",
        "train.steps=1", "train.validation_prompts=[]", "train.log_with=none", f"train.output_dir={run}", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import write_tiny_model

    from tsm.data import write_digits_image_folder

    root = tmp_path_factory.mktemp("tiny_sd15")
    return {
        "model": write_tiny_model("sd15", root / "sd15"),
        "images": write_digits_image_folder(root / "images", n=4, size=16),
    }


@pytest.fixture(scope="module")
def paper_run(tiny, tmp_path_factory) -> Path:
    """One step of `tsm train sd15_paper`, a batch of 1 per expert."""
    from tsm.cli import main

    run = tmp_path_factory.mktemp("paper") / "run"
    assert main(_train("sd15_paper", tiny, run, "train.batch_size=1")) == 0
    return run


def test_the_paper_config_trains_a_batch_per_expert_in_micro_batches(paper_run):
    """`tsm train sd15_paper` on a tiny SD1.5 folder: 9 experts, each a batch of its own a step, one micro-batch
    per expert's batch; every expert of both scales receives a gradient."""
    from safetensors.torch import load_file

    weights = load_file(paper_run / "unet.safetensors")
    names = {k.rsplit(".", 1)[1] for k in weights if ".lora_B." in k}
    assert names == {f"s0_i{i}" for i in range(8)} | {"s1_i0"}
    for name in names:  # B starts at 0: one step moved every expert's B somewhere
        assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith(f".lora_B.{name}"))


def test_info_names_the_form_of_a_default_run_and_of_its_files(tiny, paper_run, tmp_path, capsys):
    """`tsm info` on the checkpoint and on an exported file of `tsm train sd15_foster` says it is shared +
    residual and the files' rank; a paper-form file says nothing extra."""
    from safetensors.torch import load_file

    from tsm.cli import main

    run, exported = tmp_path / "foster", tmp_path / "e2.safetensors"
    assert main(_train("sd15_foster", tiny, run, "train.batch_size=2")) == 0, capsys.readouterr().err
    assert main(["export", str(run), "--scale", "0", "--index", "2", "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["info", str(run / "unet.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "form: shared + residual: a full-range LoRA of rank 8 on every t\n" in out
    assert main(["info", str(exported)]) == 0
    assert "(so each file is one LoRA of rank 10)" in capsys.readouterr().out
    ranks = {v.shape[0] for k, v in load_file(exported).items() if k.endswith(".lora_A.weight")}
    assert ranks == {10}  # what info says
    capsys.readouterr()
    assert main(["info", str(paper_run / "unet.safetensors")]) == 0
    assert "form:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(scales=(4, 1), routing="smooth"), "form: smooth routing\n"),
        (dict(scales=(1,), modulation="table"), "form: rank channels modulated by t (table, 20 bins)\n"),
        (dict(scales=(1,), rank_schedule="tlora"), "form: rank schedule tlora (min rank 1)\n"),
        (
            dict(scales=(4,), shared_rank=8),
            "form: shared + residual: a full-range LoRA of rank 8 on every t\n",
        ),
    ],
)
def test_info_names_every_form_of_a_checkpoint(spec, words, tmp_path):
    from test_io import tiny_unet, with_experts

    import tsm

    path = tsm.save(with_experts(tiny_unet(), **spec), tmp_path / "unet.safetensors")
    text = tsm.io.describe(path)
    assert words in text and text.count("form:") == 1
