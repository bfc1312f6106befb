"""The digits benchmark end to end at a toy budget: files written, metrics recomputed from the PNGs, resume."""

import json

import pytest
import torch

from tsm.bench.digits import (
    TASKS,
    BenchConfig,
    Budget,
    comparisons,
    eval_png,
    eval_set,
    read_eval_png,
    rows_for,
    run,
    verdict,
)
from tsm.bench.digits_model import pretrain_base
from tsm.bench.metrics import color_accuracy, digit_accuracy, fid, ink, load_or_train_digit_net

ROWS = [
    "base",
    "LoRA r=4",
    "LoRA r=4, 4x steps",
    "LoRA r=16, 4x steps",
    "TSM 1-stage n=4",
    "TSM 2-stage 4+1",
    "TSM shared r=8 + n=4 r=2",  # a variant row: held parameters counted with its shared LoRA
    "TSM 2-stage 4+1 joint",  # reuses the 2-stage's fostered experts (a --full row)
    "TSM shared r=8 + n=4 r=2, 4x steps",  # a mixed-batch row: one batch a step, split over the experts
]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    base = pretrain_base(
        root / "base", steps=2, batch=8, progress=False
    )  # a toy base: the machinery, not quality
    budget = Budget(steps=2, batch=4, assemble_steps=2, eval_per_prompt=1, sample_steps=2)
    cfg = BenchConfig(
        out=str(root / "out"),
        full=True,  # with `only`: the quick rows and two of --full's
        seeds=SEEDS,
        budget=budget,
        workers=0,
        base=str(base),
        only=ROWS,
        net_steps=60,
    )
    return cfg, run(cfg, progress=False)


def test_every_output_file_exists(toy_run):
    cfg, summary = toy_run
    out = cfg.out
    from pathlib import Path

    out = Path(out)
    grids = [f"grid_{t}_seed{s}.png" for t in TASKS for s in SEEDS]
    for name in ("results.json", "results.md", "results.png", *grids):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == len(TASKS) * len(SEEDS) * len(ROWS)
    md = (out / "results.md").read_text()
    assert "2 seeds" in md and all(name in md for name in ROWS) and "Verdicts on" in md
    for r in [r for t in TASKS for r in rows_for(t, False, 0)]:
        assert eval_png(out, r).is_file() == (r.name in ROWS)
    assert set(summary["table"]) == set(TASKS)
    # every TSM row has its verdicts, against the rows `comparisons` names, in results.json and results.md
    for task in TASKS:
        one = results["verdicts"][task]["TSM 1-stage n=4"]
        assert one["same rank, equal compute"]["against"] == "LoRA r=4, 4x steps"
        assert one["equal params and compute"]["against"] == "LoRA r=16, 4x steps"
        assert {v["verdict"] for v in one.values()} <= {"win", "tie", "loss"}
        assert one["equal params and compute"]["seeds"] == 2


def test_metrics_are_computed_from_the_written_images(toy_run):
    from pathlib import Path

    cfg, _ = toy_run
    out = Path(cfg.out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    net = load_or_train_digit_net(out / "digit_net.safetensors", steps=60)
    for task in TASKS:
        row = next(r for r in rows_for(task, False, 0) if r.name == "TSM 2-stage 4+1")
        prompts, _, reference, combos = eval_set(task, 1)
        images = read_eval_png(eval_png(out, row), len(prompts))
        assert images.shape == (len(prompts), 3, 8, 8) and images.min() >= -1 and images.max() <= 1
        saved = rows[row.key]
        assert saved["fid"] == pytest.approx(fid(net, images, reference), rel=1e-9)
        assert saved["digit_acc"] == digit_accuracy(net, images, [d for d, _, _ in combos])
        if task in ("domain", "post"):  # colours scored on the prompts that name them
            idx = [i for i, c in enumerate(combos) if c[1]]
            acc = color_accuracy(images[idx], [combos[i][1] for i in idx], [combos[i][2] for i in idx])
            assert saved["color_acc"] == acc["both"] and saved["fg_acc"] == acc["fg"]
            assert len(idx) == (len(combos) if task == "domain" else len(combos) // 2)
            # the same numbers do not come out of other images: the file is what was scored
            assert fid(net, torch.flip(images, dims=[-1]), reference) != saved["fid"]
        if task == "appearance":
            coverage = float(ink(images).mean())
            assert saved["ink"] == pytest.approx(coverage) and saved["ink_err"] == pytest.approx(
                abs(coverage - float(ink(reference).mean()))
            )


def test_budgets_follow_the_paper_bookkeeping(toy_run):
    from pathlib import Path

    cfg, _ = toy_run
    rows = json.loads((Path(cfg.out) / "results.json").read_text())["rows"]
    b = cfg.budget
    lora = rows["domain/LoRA r=4/seed0"]
    assert lora["samples_trained"] == b.steps * b.batch
    one = rows["domain/TSM 1-stage n=4/seed0"]
    assert (
        one["samples_trained"]
        == 4 * b.steps * b.batch
        == rows["domain/LoRA r=16, 4x steps/seed0"]["samples_trained"]
    )
    assert (
        one["expert_params"]
        == 4 * lora["expert_params"]
        == rows["domain/LoRA r=16, 4x steps/seed0"]["expert_params"]
    )
    two = rows["domain/TSM 2-stage 4+1/seed0"]
    assert two["samples_trained"] == 5 * b.steps * b.batch + b.assemble_steps * b.batch
    assert two["expert_params"] == 5 * lora["expert_params"]  # 5 experts of the same rank
    # shared r=8 + 4 experts of r=2 hold what LoRA r=16 holds, for the same samples
    shared = rows["domain/TSM shared r=8 + n=4 r=2/seed0"]
    assert shared["expert_params"] == rows["domain/LoRA r=16, 4x steps/seed0"]["expert_params"]
    assert shared["samples_trained"] == one["samples_trained"]
    joint = rows["domain/TSM 2-stage 4+1 joint/seed0"]
    assert (
        joint["samples_trained"] == two["samples_trained"] and joint["expert_params"] == two["expert_params"]
    )
    assert joint["trained_params"] > two["trained_params"]  # the experts train on with the routers
    mixed = rows["domain/TSM shared r=8 + n=4 r=2, 4x steps/seed0"]  # LoRA r=16's steps, batch and params
    assert (
        mixed["samples_trained"] == one["samples_trained"]
        and mixed["expert_params"] == shared["expert_params"]
    )
    # joint assembling starts from the very experts the faithful 2-stage row fostered (one foster run)
    fostered = [d.name for d in (Path(cfg.out) / "work").glob("fostered_domain_4-1_*") if d.is_dir()]
    assert sorted(fostered) == [f"fostered_domain_4-1_seed{s}" for s in SEEDS]
    assert rows["domain/base/seed0"]["samples_trained"] == 0


def test_resume_skips_finished_rows(toy_run, capsys):
    cfg, _ = toy_run
    run(cfg, progress=False)
    n = len(TASKS) * len(SEEDS) * len(ROWS)
    assert f"{n} of {n} rows already in" in capsys.readouterr().out


def test_rows_run_in_worker_processes(toy_run, tmp_path):
    """The default mode trains rows in spawned worker processes: one small row through that path."""
    cfg, _ = toy_run
    from dataclasses import replace

    solo = replace(cfg, out=str(tmp_path / "solo"), workers=1, only=["LoRA r=4"], tasks=["post"], seeds=[0])
    summary = run(solo, progress=False)
    assert set(summary["table"]["post"]) == {"LoRA r=4"}
    assert (
        json.loads((tmp_path / "solo" / "results.json").read_text())["rows"]["post/LoRA r=4/seed0"]["fid"] > 0
    )


def test_verdicts_on_hand_made_numbers():
    # higher is better: a gain of 0.10 +- 0.005 over 3 seeds is a win; lower-is-better flips the sign
    assert verdict([0.5, 0.6, 0.7], [0.4, 0.49, 0.61], True)["verdict"] == "win"
    assert verdict([0.5, 0.6, 0.7], [0.4, 0.49, 0.61], False)["verdict"] == "loss"
    # a mean gain inside 2 standard errors of the paired difference is a tie
    tie = verdict([0.5, 0.3, 0.7], [0.45, 0.45, 0.5], True)
    assert tie["verdict"] == "tie" and tie["mean_gain"] > 0 and tie["mean_gain"] < 2 * tie["se"]
    # FID (lower is better): ours 20 vs 30 on every seed -> win, with se 0
    win = verdict([20.0, 21.0, 19.0], [30.0, 31.0, 29.0], False)
    assert win["verdict"] == "win" and win["mean_gain"] == pytest.approx(10.0) and win["se"] == 0
    assert verdict([1.0], [0.0], True)["verdict"] == "n/a"  # one seed decides nothing


def test_each_tsm_row_is_judged_against_equal_compute_and_equal_parameters():
    assert comparisons("TSM 1-stage n=8") == {
        "same rank, equal compute": "LoRA r=4, 8x steps",
        "equal params and compute": "LoRA r=32, 8x steps",
    }
    assert comparisons("TSM 2-stage 8+1")["equal params and compute"] == "LoRA r=36, 10x steps"
    names = {r.name for r in rows_for("post", True, 0)}
    for name in names:  # every row a verdict needs is run (a curve point: the equal LoRA at its budget)
        needed = comparisons(name)
        if " @" in name:
            needed = {k: v for k, v in needed.items() if k == "equal params and compute"}
        assert set(needed.values()) <= names


def test_variant_rows_set_their_config_keys(tmp_path):
    from tsm.bench.digits import JOINT_LR, row_config

    rows = {r.name: r for r in rows_for("domain", True, 0)}
    budget = Budget(steps=8, assemble_steps=4)
    cfg = lambda name, **kw: row_config(rows[name], budget, tmp_path, tmp_path / "run", **kw)  # noqa: E731
    faithful = cfg("TSM 1-stage n=4")
    assert (faithful.experts.shared_rank, faithful.experts.routing) == (0, "hard")
    assert faithful.train.warm_start_fraction == 0 and faithful.train.assemble_experts_lr is None
    shared = cfg("TSM shared r=8 + n=4 r=2")
    assert (shared.experts.shared_rank, shared.experts.rank, shared.experts.scales) == (8, 2, [4])
    mixed = cfg("TSM shared r=8 + n=4 r=2, 4x steps")  # LoRA r=16 4x's steps and batch, split by t
    assert (mixed.train.steps, mixed.train.batch_size, mixed.train.batch_per_expert) == (32, 16, False)
    assert (shared.train.steps, shared.train.batch_per_expert) == (8, True)  # the paper's: a batch per expert
    assert cfg("TSM 1-stage n=4 smooth").experts.routing == "smooth"
    assert cfg("TSM 1-stage n=4 warm start").train.warm_start_fraction == 0.25
    # joint assembling: the fostering run is the faithful one; the assembling run trains the experts on
    foster = cfg("TSM 2-stage 4+1 joint")
    assert foster.train.method == "foster" and foster.train.assemble_experts_lr is None
    joint = cfg("TSM 2-stage 4+1 joint", experts_from=str(tmp_path))
    assert joint.train.method == "assemble" and joint.train.assemble_experts_lr == JOINT_LR
    # each variant is judged against LoRA r=4n at n x steps (its parameters and samples) and faithful TSM
    assert comparisons("TSM shared r=8 + n=4 r=2") == {
        "equal params and compute": "LoRA r=16, 4x steps",
        "against faithful TSM": "TSM 1-stage n=4",
    }
    assert comparisons("TSM 1-stage n=4 smooth")["against faithful TSM"] == "TSM 1-stage n=4"
    assert comparisons("TSM 2-stage 4+1 joint")["equal params and compute"] == "LoRA r=20, 6x steps"
    assert comparisons("TSM shared r=8 + n=4 r=2, 4x steps") == {
        "equal params and compute": "LoRA r=16, 4x steps",
        "against its paper-bookkeeping twin": "TSM shared r=8 + n=4 r=2",
    }
    quick = {r.name for r in rows_for("domain", False, 0)}
    assert "TSM shared r=8 + n=4 r=2, 4x steps" in quick and "TSM 1-stage n=4 smooth" not in quick


def test_quality_vs_compute_curve(tmp_path):
    """--full's curve rows: LoRA r=32 at 8x and TSM n=8 at half and twice the budget, plotted by samples."""
    from tsm.bench.digits import CURVES, curve_plot, curve_points, row_units

    rows = {r.name: r for r in rows_for("post", True, 0)}
    b = Budget(steps=10, batch=4)
    for name in CURVES:
        units = [row_units(rows[n], b) for n in (f"{name} @0.5x", name, f"{name} @2x")]
        assert units == [units[1] // 2, units[1], 2 * units[1]]
        # a curve point is judged against the same LoRA rows at its own budget
        assert comparisons(f"{name} @2x") == {k: f"{v} @2x" for k, v in comparisons(name).items()}
    assert comparisons("TSM 1-stage n=8 @0.5x")["equal params and compute"] == "LoRA r=32, 8x steps @0.5x"
    entries = {
        "TSM 1-stage n=8": {"samples_trained": 200, "fid": (50.0, 1.0)},
        "TSM 1-stage n=8 @2x": {"samples_trained": 400, "fid": (40.0, 2.0)},
        "TSM 1-stage n=8 @0.5x": {"samples_trained": 100, "fid": (70.0, 3.0)},
    }
    assert curve_points(entries, "TSM 1-stage n=8", "fid") == [
        (100, 70.0, 3.0),
        (200, 50.0, 1.0),
        (400, 40.0, 2.0),
    ]
    curve_plot({"post": entries}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    curve_plot({"post": {"TSM 1-stage n=8": entries["TSM 1-stage n=8"]}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()  # one point is no curve
