"""Sampling defaults a user can trust: each family's diffusers pipeline's own, the digits model's chosen on
validation data (never on the test set)."""

from __future__ import annotations

import inspect
import json

import diffusers
import pytest

from tsm.bench.digits import eval_set
from tsm.bench.digits_sampler import choose
from tsm.models import get_family
from tsm.models.digits import SAMPLER_FILE

PIPELINES = {  # family -> (pipeline, its guidance argument)
    "sd15": ("StableDiffusionPipeline", "guidance_scale"),
    "pixart": ("PixArtAlphaPipeline", "guidance_scale"),
    "sd3": ("StableDiffusion3Pipeline", "guidance_scale"),
    "video3d": ("TextToVideoSDPipeline", "guidance_scale"),
    "flux": ("FluxPipeline", "true_cfg_scale"),  # tsm's guidance is true CFG; Flux's embedded 3.5 stays
    "qwen": ("QwenImagePipeline", "true_cfg_scale"),
}


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_family_defaults_are_the_pipelines(family):
    pipeline, guidance = PIPELINES[family]
    params = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    f = get_family(family)
    assert f.default_steps == params["num_inference_steps"].default
    assert f.default_guidance == params[guidance].default


def test_the_digits_sampler_is_the_validated_choice():
    from tsm.models.digits import SCHEDULERS

    shipped = json.loads(SAMPLER_FILE.read_text())
    assert shipped["chosen"] == choose(shipped["rows"])
    assert {r["scheduler"] for r in shipped["rows"]} == set(SCHEDULERS)  # both kinds were validated
    f = get_family("digits")
    assert (f.default_scheduler, f.default_steps, f.default_guidance) == (
        shipped["chosen"]["scheduler"],
        shipped["chosen"]["steps"],
        shipped["chosen"]["guidance"],
    )
    c = f.load("")
    assert type(c.scheduler).__name__ == SCHEDULERS[shipped["chosen"]["scheduler"]]
    # the benchmark's target: the base draws the digit its prompt names at least 95% of the time
    assert shipped["chosen"]["digit_acc"] >= 0.95


def test_choose_takes_the_lowest_fid_among_accurate_samplers_then_fewer_steps():
    rows = [
        {"steps": 50, "guidance": 1.5, "digit_acc": 0.99, "fid": 40.0},
        {"steps": 25, "guidance": 1.5, "digit_acc": 0.96, "fid": 40.0},  # as good, fewer steps
        {"steps": 10, "guidance": 1.0, "digit_acc": 0.90, "fid": 20.0},  # lowest FID, but inaccurate
        {"steps": 25, "guidance": 5.0, "digit_acc": 1.00, "fid": 170.0},  # most accurate, over-saturated
    ]
    assert (choose(rows)["steps"], choose(rows)["guidance"]) == (25, 1.5)
    rows[2]["digit_acc"] = 0.95  # now accurate enough: its lower FID wins
    assert (choose(rows)["steps"], choose(rows)["guidance"]) == (10, 1.0)
    for r in rows:
        r["digit_acc"] -= 0.2  # none accurate enough: the most accurate
    assert choose(rows)["guidance"] == 5.0


def test_the_validation_set_shares_nothing_with_the_test_set():
    for task in ("source", "post", "domain"):
        vp, vs, vref, vcombos = eval_set(task, 1, split="train")
        tp, ts, tref, tcombos = eval_set(task, 1)
        assert not set(vs) & set(ts)  # other seeds
        named = {c for c in vcombos if c[1]}
        assert not named & {c for c in tcombos if c[1]}  # other (digit, fg, bg) combos
        assert bool(named) == (task != "source")
        assert not any((a == b).all() for a in vref for b in tref[:20])  # other real digits


def test_tsm_sample_on_a_digits_run_uses_the_validated_sampler(tmp_path, monkeypatch):
    import yaml

    import tsm.recipes.run as run_module
    from tsm.bench.digits_data import write_folder
    from tsm.cli import main

    data = write_folder(tmp_path / "data", "source", n=8)
    cfg = {
        "model": {"family": "digits"},
        "experts": {"scales": [1], "rank": 2},
        "data": {"path": str(data), "resolution": 8, "cache": False},
        "train": {"method": "lora", "steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "run"),
                  "validation_prompts": [], "log_with": "none"},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    seen = {}

    def fake_sample_run(cfg, c, prompts, seeds, steps, guidance_scale, resolution, progress=True):
        seen.update(steps=steps, guidance=guidance_scale)
        import torch

        return torch.zeros(len(prompts), 3, 8, 8)

    monkeypatch.setattr(run_module, "sample_run", fake_sample_run)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "digit 3", "--seeds", "0"]) == 0
    chosen = json.loads(SAMPLER_FILE.read_text())["chosen"]
    assert seen == {"steps": chosen["steps"], "guidance": chosen["guidance"]}
    assert (
        main(["sample", str(tmp_path / "run"), "--prompt", "digit 3", "--seeds", "0", "--guidance", "2"]) == 0
    )
    assert seen["guidance"] == 2.0
