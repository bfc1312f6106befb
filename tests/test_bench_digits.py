"""The digits benchmark end to end at a toy budget: files written, metrics recomputed from the PNGs, resume."""

import json

import pytest
import torch

from tsm.bench.digits import BenchConfig, Budget, eval_png, eval_set, read_eval_png, rows_for, run
from tsm.bench.digits_model import pretrain_base
from tsm.bench.metrics import color_accuracy, digit_accuracy, fid, load_or_train_digit_net

ROWS = ["base", "LoRA r=4", "TSM 1-stage n=2", "TSM 2-stage 8+1"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    base = pretrain_base(
        root / "base", steps=2, batch=8, progress=False
    )  # a toy base: the machinery, not quality
    budget = Budget(steps=2, batch=4, assemble_steps=2, eval_per_prompt=1, sample_steps=2)
    cfg = BenchConfig(
        out=str(root / "out"), budget=budget, workers=0, base=str(base), only=ROWS, net_steps=60
    )
    return cfg, run(cfg, progress=False)


def test_every_output_file_exists(toy_run):
    cfg, summary = toy_run
    out = cfg.out
    from pathlib import Path

    out = Path(out)
    for name in ("results.json", "results.md", "results.png", "grid_domain_seed0.png", "grid_post_seed0.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * len(ROWS)
    md = (out / "results.md").read_text()
    assert "one seed" in md and all(name in md for name in ROWS)
    for r in rows_for("domain", False, 0) + rows_for("post", False, 0):
        assert eval_png(out, r).is_file() == (r.name in ROWS)
    assert set(summary["table"]) == {"domain", "post"}


def test_metrics_are_computed_from_the_written_images(toy_run):
    from pathlib import Path

    cfg, _ = toy_run
    out = Path(cfg.out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    net = load_or_train_digit_net(out / "digit_net.safetensors", steps=60)
    for task in ("domain", "post"):
        row = next(r for r in rows_for(task, False, 0) if r.name == "TSM 2-stage 8+1")
        prompts, _, reference, combos = eval_set(task, 1)
        images = read_eval_png(eval_png(out, row), len(prompts))
        assert images.shape == (len(prompts), 3, 8, 8) and images.min() >= -1 and images.max() <= 1
        saved = rows[row.key]
        assert saved["fid"] == pytest.approx(fid(net, images, reference), rel=1e-9)
        assert saved["digit_acc"] == digit_accuracy(net, images, [d for d, _, _ in combos])
        if task == "domain":
            acc = color_accuracy(images, [f for _, f, _ in combos], [b for _, _, b in combos])
            assert saved["color_acc"] == acc["both"] and saved["fg_acc"] == acc["fg"]
            # the same numbers do not come out of other images: the file is what was scored
            assert fid(net, torch.flip(images, dims=[-1]), reference) != saved["fid"]


def test_budgets_follow_the_paper_bookkeeping(toy_run):
    from pathlib import Path

    cfg, _ = toy_run
    rows = json.loads((Path(cfg.out) / "results.json").read_text())["rows"]
    b = cfg.budget
    lora = rows["domain/LoRA r=4/seed0"]
    assert lora["samples_trained"] == b.steps * b.batch
    assert rows["domain/TSM 1-stage n=2/seed0"]["samples_trained"] == 2 * b.steps * b.batch
    two = rows["domain/TSM 2-stage 8+1/seed0"]
    assert two["samples_trained"] == 9 * b.steps * b.batch + b.assemble_steps * b.batch
    assert two["expert_params"] == 9 * lora["expert_params"]  # 9 experts of the same rank
    assert rows["domain/base/seed0"]["samples_trained"] == 0


def test_resume_skips_finished_rows(toy_run, capsys):
    cfg, _ = toy_run
    run(cfg, progress=False)
    assert f"{2 * len(ROWS)} of {2 * len(ROWS)} rows already in" in capsys.readouterr().out


def test_rows_run_in_worker_processes(toy_run, tmp_path):
    """The default mode trains rows in spawned worker processes: one small row through that path."""
    cfg, _ = toy_run
    from dataclasses import replace

    solo = replace(cfg, out=str(tmp_path / "solo"), workers=1, only=["LoRA r=4"], tasks=["post"])
    summary = run(solo, progress=False)
    assert set(summary["table"]["post"]) == {"LoRA r=4"}
    assert (
        json.loads((tmp_path / "solo" / "results.json").read_text())["rows"]["post/LoRA r=4/seed0"]["fid"] > 0
    )
