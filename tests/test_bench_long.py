"""`tsm bench digits --long`: the rows at every budget, their verdicts against the equal LoRA, curves, resume."""

import json
from pathlib import Path

import pytest

from tsm.bench.digits import (
    BINDING_CHANCE,
    BenchConfig,
    Budget,
    budget_matrix,
    comparisons,
    long_rows,
    main,
    row_config,
    row_units,
    run,
    split_budget,
)
from tsm.bench.digits_model import pretrain_base
from tsm.errors import TsmError

FORMS = [
    "LoRA r=16, 4x steps",
    "TSM 1-stage n=4",
    "TSM 1-stage n=4, 4x steps",
    "TSM shared r=8 + n=4 r=2, 4x steps",
    "TSM shared r=8 + n=4 r=2 share-scaled lr, 4x steps",
    "LoRA r=16 modulated, 4x steps",
    "T-LoRA r=16, 4x steps",
]


def test_long_rows_are_every_form_at_every_budget_with_equal_samples():
    rows = long_rows("domain", (4,), (1.0, 4.0, 16.0))
    names = [r.name for r in rows]
    assert names[0] == "base" and len(names) == 1 + 3 * len(FORMS) == len(set(names))
    assert names[1:8] == FORMS  # 1x: the quick rows' own names
    assert [n for n in names if n.endswith(" @16x")] == [f"{f} @16x" for f in FORMS]
    b = Budget(steps=10, batch=4)
    for scale, at in ((1.0, ""), (4.0, " @4x"), (16.0, " @16x")):
        at_budget = [r for r in rows if r.name != "base" and split_budget(r.name)[1] == at]
        assert {r.budget_scale for r in at_budget} == {scale}
        # every form sees the equal LoRA's samples: 4 experts x 10 steps x 4, or 40 steps x 4, times the budget
        assert {row_units(r, b) for r in at_budget} == {round(160 * scale)}
    for r in rows:  # every LoRA a verdict needs is run (the same-rank LoRA r=4 is not a --long row)
        judged = ("equal params and compute", "same LoRA, equal compute", "against its unscaled twin")
        needed = {other for what, other in comparisons(r.name).items() if what in judged}
        assert r.name == "base" or r.name.startswith("LoRA r=16, ") or needed
        assert needed <= set(names), r.name
    eight = {r.name: r for r in long_rows("domain", (4, 8), (16.0,))}  # --long-n 4 8 adds n = 8's rows
    assert len(eight) == 1 + 2 * len(FORMS)
    lora8, tsm8 = eight["LoRA r=32, 8x steps @16x"], eight["TSM shared r=16 + n=8 r=2, 8x steps @16x"]
    assert (lora8.rank, lora8.step_factor, tsm8.shared_rank, tsm8.scales) == (32, 8, 16, (8,))
    assert row_units(lora8, b) == row_units(tsm8, b) == 10 * 4 * 8 * 16
    assert comparisons(tsm8.name)["equal params and compute"] == lora8.name
    assert split_budget("TSM 1-stage n=4 @16x") == ("TSM 1-stage n=4", " @16x")
    assert split_budget("LoRA r=16, 4x steps") == ("LoRA r=16, 4x steps", "")


def test_long_rows_judge_against_the_equal_lora_at_their_own_budget(tmp_path):
    assert comparisons("TSM 1-stage n=4 @16x") == {
        "same rank, equal compute": "LoRA r=4, 4x steps @16x",  # not a --long row: skipped there
        "equal params and compute": "LoRA r=16, 4x steps @16x",
    }
    assert comparisons("TSM shared r=8 + n=4 r=2 share-scaled lr, 4x steps @4x") == {
        "equal params and compute": "LoRA r=16, 4x steps @4x",
        "against its unscaled twin": "TSM shared r=8 + n=4 r=2, 4x steps @4x",
    }
    assert comparisons("T-LoRA r=16, 4x steps @16x") == {
        "same LoRA, equal compute": "LoRA r=16, 4x steps @16x"
    }
    rows = {r.name: r for r in long_rows("domain")}
    budget = Budget(steps=8)
    scaled = row_config(
        rows["TSM shared r=8 + n=4 r=2 share-scaled lr, 4x steps @16x"], budget, tmp_path, tmp_path
    )
    assert scaled.train.share_scaled_lr and not scaled.train.batch_per_expert
    assert (scaled.experts.shared_rank, scaled.experts.rank, scaled.train.steps) == (8, 2, 8 * 4 * 16)
    plain = row_config(rows["TSM shared r=8 + n=4 r=2, 4x steps @16x"], budget, tmp_path, tmp_path)
    assert not plain.train.share_scaled_lr and plain.train.steps == 512
    faithful = row_config(rows["TSM 1-stage n=4 @4x"], budget, tmp_path, tmp_path)
    assert (faithful.train.steps, faithful.train.batch_per_expert) == (32, True)  # 8 steps per expert x 4


def test_budget_matrix_reads_the_verdicts_and_binding_of_every_budget():
    def entry(acc, verdicts=None):
        return {"color_acc": (acc, 0.01), "verdicts": verdicts or {}}

    v = {"verdict": "win", "mean_gain": 12.5, "se": 3.0}
    entries = {
        "base": entry(0.03),
        "LoRA r=16, 4x steps": entry(0.05),
        "TSM 1-stage n=4": entry(
            0.04, {"equal params and compute": {**v, "verdict": "loss", "mean_gain": -7}}
        ),
        "LoRA r=16, 4x steps @16x": entry(0.2),
        "TSM 1-stage n=4 @16x": entry(0.25, {"equal params and compute": v}),
        "T-LoRA r=16, 4x steps @16x": entry(0.1, {"same LoRA, equal compute": {**v, "verdict": "tie"}}),
    }
    text = "\n".join(budget_matrix("domain", entries, [1.0, 16.0]))
    assert "| TSM 1-stage n=4 | **loss** -7 ± 3 | **win** +12.5 ± 3 |" in text
    assert (
        "| T-LoRA r=16, 4x steps | — | **tie** +12.5 ± 3 |" not in text
    )  # no 1x row: not a form of the table
    assert f"chance {BINDING_CHANCE:.3f}" in text
    assert "| base | 0.030 ± 0.010 | 0.030 ± 0.010 |" in text
    assert "| TSM 1-stage n=4 | 0.040 ± 0.010 | 0.250 ± 0.010 |" in text
    assert "| LoRA r=16, 4x steps | 0.050 ± 0.010 | 0.200 ± 0.010 |" in text
    assert "fg+bg" not in "\n".join(budget_matrix("appearance", entries, [1.0, 16.0]))


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    base = pretrain_base(root / "base", steps=2, batch=8, progress=False)
    cfg = BenchConfig(
        out=str(root / "out"),
        seeds=[0, 1],
        tasks=["domain"],
        budget=Budget(steps=1, batch=4, eval_per_prompt=1, sample_steps=2),
        workers=0,
        base=str(base),
        only=[
            "base",
            "LoRA r=16, 4x steps",
            "LoRA r=16, 4x steps @2x",
            "TSM 1-stage n=4",
            "TSM 1-stage n=4 @2x",
        ],
        net_steps=60,
        long=True,
        budgets=[1.0, 2.0],
    )
    return cfg, run(cfg, progress=False)


def test_long_run_writes_the_matrix_curves_and_largest_budget_grids(long_run):
    cfg, summary = long_run
    out = Path(cfg.out)
    table = summary["table"]["domain"]
    assert (
        table["TSM 1-stage n=4 @2x"]["samples_trained"]
        == 2 * table["TSM 1-stage n=4"]["samples_trained"]
        == 32
    )
    md = (out / "results.md").read_text()
    assert md.startswith("# Digits benchmark\n\nMode: long;")
    results = json.loads((out / "results.json").read_text())
    for name, at in (("TSM 1-stage n=4", "1x"), ("TSM 1-stage n=4 @2x", "2x")):
        v = results["verdicts"]["domain"][name]["equal params and compute"]
        b = results["binding_verdicts"]["domain"][name]["equal params and compute"]
        assert v["metric"] == "fid" and b["metric"] == "color_acc" and v["seeds"] == b["seeds"] == 2
        assert f"**{v['verdict']}** {v['mean_gain']:+.3g} ± {v['se']:.2g}" in md, at
    assert (out / "curves.png").stat().st_size > 5000
    grid = out / "grid_domain_seed0.png"
    from PIL import Image

    assert (
        Image.open(grid).height == 3 * 8 * 3
    )  # base and the two rows of the largest budget, not the 1x ones


def test_long_run_resumes_from_finished_rows(long_run, capsys):
    cfg, _ = long_run
    run(cfg, progress=False)
    assert "resuming: 10 of 10 rows already in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--long", "--full"], "--long and --full"),
        (["--budgets", "1", "4"], "add --long"),
        (["--long", "--long-n", "1"], "expert counts >= 2"),
        (["--long", "--budgets", "0"], "positive multiples"),
        (["--long", "--only", "LoRA r=16 @16x"], "no row named 'LoRA r=16 @16x'"),
    ],
)
def test_long_flags_are_checked(argv, message):
    with pytest.raises(TsmError, match=message):
        main(argv)


def test_default_form_never_loses_and_wins_two_thirds_at_the_largest_budget():
    from tsm.bench.digits import default_form_lines, default_forms

    def v(word):
        return {"verdicts": {"equal params and compute": {"verdict": word, "mean_gain": 1.0, "se": 0.1}}}

    def task(good, shaky, at_top):  # verdicts of two forms at 1x and 16x
        return {
            "LoRA r=16, 4x steps": {"verdicts": {}},
            "LoRA r=16, 4x steps @16x": {"verdicts": {}},
            "good": v(good[0]),
            "good @16x": v(good[1]),
            "shaky": v(shaky[0]),
            "shaky @16x": v(at_top),
        }

    table = {
        "domain": task(("tie", "win"), ("loss", "win"), "win"),
        "post": task(("win", "tie"), ("win", "win"), "win"),
        "appearance": task(("tie", "win"), ("tie", "win"), "win"),
    }
    forms = default_forms(table, [1.0, 16.0])
    assert set(forms) == {"good", "shaky"}  # the equal LoRA is not a candidate
    assert forms["good"] == {
        "complete": True,
        "losses": [],
        "wins_at_largest": ["domain", "appearance"],
        "qualifies": True,
    }
    assert forms["shaky"]["losses"] == ["domain 1x"] and not forms["shaky"]["qualifies"]
    table["post"]["good @16x"] = v("loss")
    assert default_forms(table, [1.0, 16.0])["good"]["losses"] == ["post 16x"]
    del table["appearance"]["good"]  # a missing row: not judged yet
    del table["post"]["good @16x"]
    forms = default_forms(table, [1.0, 16.0])
    assert forms["good"]["complete"] is False and forms["good"]["qualifies"] is False
    assert "| good | none | domain, appearance | not yet (rows missing) |" in "\n".join(
        default_form_lines(table, [1.0, 16.0])
    )


def test_one_benchmark_holds_its_folder_and_clears_rows_left_by_a_killed_one(long_run, capsys):
    import os

    from tsm.rundir import RunLock

    cfg, _ = long_run
    out = Path(cfg.out)
    with RunLock(out):  # another live benchmark (this process) holds the folder: refused in one line
        with pytest.raises(TsmError, match=r"in use by another tsm bench digits .* give it another --out"):
            run(cfg, progress=False)
    # a row killed mid-run left its lock, naming a pid that is alive now (this one): it is retrained anyway
    results = json.loads((out / "results.json").read_text())
    key = "domain/TSM 1-stage n=4 @2x/seed1"
    before = results["rows"].pop(key)
    (out / "results.json").write_text(json.dumps(results))
    row_dir = out / "work" / "domain__tsm_1-stage_n4_@2x__seed1"
    (row_dir / "run.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()})
    )
    run(cfg, progress=False)
    after = json.loads((out / "results.json").read_text())["rows"][key]
    assert not (row_dir / "run.lock").exists() and not (out / "run.lock").exists()
    assert (
        after["fid"] == before["fid"] and after["color_acc"] == before["color_acc"]
    )  # the same row, retrained
    assert "resuming: 9 of 10 rows already in" in capsys.readouterr().out


def test_only_runs_the_named_rows_of_every_task_and_seed(monkeypatch):
    import tsm.bench.digits as D

    seen = {}
    monkeypatch.setattr(D, "run", lambda cfg: seen.setdefault("rows", cfg.rows()))
    names = ["LoRA r=32, 8x steps @16x", "TSM shared r=16 + n=8 r=2, 8x steps @16x"]
    D.main(["--long", "--long-n", "8", "--budgets", "16", "--tasks", "domain", "post", "--only", *names])
    rows = seen["rows"]
    assert sorted({(r.task, r.name) for r in rows}) == sorted(
        (t, n) for t in ("domain", "post") for n in names
    )
    assert sorted(r.seed for r in rows) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    lora, shared = (next(r for r in rows if r.name == n) for n in names)
    assert (lora.rank, lora.step_factor, lora.budget_scale) == (32, 8, 16)
    assert (shared.shared_rank, shared.rank, shared.scales, shared.mixed) == (16, 2, (8,), True)
