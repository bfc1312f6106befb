"""The few-step digits rows run end to end at a toy budget, write their tables and verdicts, and resume."""

import json

import pytest
import torch

from tsm.bench import digits, digits_fast
from tsm.bench.digits_common import ATTN
from tsm.bench.digits_model import pretrain_base
from tsm.bench.digits_sampler import SCHEDULER_LABELS
from tsm.errors import TsmError
from tsm.models.digits import DigitsFamily

TOY = ["--updates", "2", "--batch", "2", "--glance-steps", "2", "--per-prompt", "1", "--threads", "1"]
TOY += ["--teacher-steps", "5", "--seeds", "0", "1"]


def cells(line: str) -> list[str]:
    """The cells of a markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One toy run (through `tsm bench digits --few-step`, into OUT/fast): its folder, options and result."""
    tmp = tmp_path_factory.mktemp("few_step")
    base = pretrain_base(tmp / "base", steps=2, batch=8, progress=False)
    args = ["--base", str(base), *TOY]
    result = digits.main(["--few-step", "--out", str(tmp), *args])
    return tmp / "fast", args, result


def test_few_step_rows_at_a_toy_budget(run):
    out, _, result = run
    names = [r["name"] for r in result["distill"]] + [r["name"] for r in result["glance"]]
    assert "4-step TSM 2-stage" in names and "Glance + router, 10 pairs" in names
    saved = json.loads((out / "results.json").read_text())
    # distillation: 3 teacher rows at the family's scheduler, 2 DDIM, the untrained generator, 4 students;
    # Glance: 2 at the family's scheduler, 2 DDIM, Glance's steps bare, 3 trained rows for each of 1 and 10 pairs
    assert len(saved["distill"]) == 10 and len(saved["glance"]) == 11
    md = (out / "results.md").read_text()
    assert "÷ teacher (first row)" in md and all(n in md for n in names)
    rows = saved["distill"] + saved["glance"]
    assert all(r["sample_seconds"] > 0 and r["fid"] == r["fid"] for r in rows)
    trained = [r for r in rows if "train_seconds" in r]
    assert len(trained) == 10 and all(r["seeds"] == 2 and len(r["per_seed"]) == 2 for r in trained)
    for r in trained:  # the row is the mean of its seeds
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
        assert abs(r["fid"] - sum(p["fid"] for p in r["per_seed"]) / 2) < 1e-6
    assert "±" in md
    # one PNG per untrained row (the teacher rows are shared by both tables), one per seed of a trained row
    untrained = {r["name"] for r in rows if "train_seconds" not in r}
    assert len(untrained) == 8
    assert len(list((out / "eval_images").glob("*.png"))) == len(untrained) + 2 * len(trained)


def test_the_first_row_is_the_teacher_at_the_validated_sampler(run):
    out, _, _ = run
    family = DigitsFamily()
    kind, steps, guidance = family.default_scheduler, family.default_steps, family.default_guidance
    label = f"teacher, {steps} {SCHEDULER_LABELS[kind]} steps, guidance {guidance:g} (validated)"
    saved = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert cells(header)[4] == "÷ teacher (first row)"
    for section in ("distill", "glance"):
        assert saved[section][0]["name"] == label
        names = [r["name"] for r in saved[section]]
        assert f"teacher, 5 {SCHEDULER_LABELS[kind]} steps, guidance {guidance:g}" in names  # --teacher-steps
        assert "teacher, 5 DDIM steps" in names  # the earlier tables' reference, for continuity
    assert f"teacher, 4 {SCHEDULER_LABELS[kind]} steps, guidance {guidance:g}" in [
        r["name"] for r in saved["distill"]
    ]
    assert "teacher, 10 uniform DDIM steps" in [r["name"] for r in saved["glance"]]
    ratio = [cells(line)[4] for line in md.splitlines() if line.startswith(f"| {label} |")]
    assert ratio == ["1.000", "1.000"]  # the first row of each table: the ratio divides by its own time


def test_the_verdicts_are_verdict_on_the_per_seed_fids(run):
    out, _, _ = run
    saved = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    expected = {
        "distill": [
            (row, other)
            for row in (digits_fast.TSM1, digits_fast.TSM2)
            for other in (digits_fast.R16, digits_fast.R4)
        ],
        "glance": [
            (digits_fast.glance_name(n, router), digits_fast.equal_lora_name(n))
            for n in (1, 10)
            for router in (False, True)
        ],
    }
    assert md.count("| row | against | as | verdict | mean gain ± SE |") == 2
    for section, pairs in expected.items():
        by_name = {r["name"]: r for r in saved[section]}
        judged = saved["verdicts"][section]
        assert [(v["row"], v["against"]) for v in judged] == pairs
        for v in judged:
            mine = [p["fid"] for p in by_name[v["row"]]["per_seed"]]
            theirs = [p["fid"] for p in by_name[v["against"]]["per_seed"]]
            want = digits.verdict(mine, theirs, higher_is_better=False)
            assert {k: v[k] for k in want} == want
            line = f"| {v['row']} | {v['against']} | {v['as']} | **{want['verdict']}** | "
            assert line + f"{want['mean_gain']:+.2f} ± {want['se']:.2f} |" in md


def test_the_equal_lora_has_both_phase_experts_parameters(run):
    out, _, _ = run
    saved = {r["name"]: r for r in json.loads((out / "results.json").read_text())["glance"]}
    for n in (1, 10):
        lora, glance = saved[digits_fast.equal_lora_name(n)], saved[digits_fast.glance_name(n, False)]
        assert lora["expert_params"] == glance["expert_params"] == lora["trained_params"]
        assert glance["trained_params"] == glance["expert_params"] > 0
        assert lora["updates"] == glance["updates"] == 2  # --glance-steps, one draw per phase each
        routed = saved[digits_fast.glance_name(n, True)]  # + a full-range rank-4 expert: 3/2 the weights
        assert 2 * routed["expert_params"] == 3 * glance["expert_params"]
        assert routed["trained_params"] > routed["expert_params"]  # and its routers
    # the numbers: r (in + out) for each attention projection, times 2 experts of rank 4 = one LoRA of rank 8
    unet = DigitsFamily().load(str(out.parent / "base")).denoiser
    projections = [m for n, m in unet.named_modules() if n.endswith(tuple(ATTN))]
    assert len(projections) > 0 and all(isinstance(m, torch.nn.Linear) for m in projections)
    per_rank = sum(m.in_features + m.out_features for m in projections)
    assert saved[digits_fast.equal_lora_name(1)]["expert_params"] == 8 * per_rank == 2 * 4 * per_rank
    distill = {r["name"]: r for r in json.loads((out / "results.json").read_text())["distill"]}
    assert distill[digits_fast.R4]["trained_params"] == 4 * per_rank
    assert (
        distill[digits_fast.R16]["trained_params"]
        == distill[digits_fast.TSM1]["trained_params"]
        == 16 * per_rank
    )


def test_a_rerun_resumes(run, capsys):
    out, args, _ = run
    path = out / "results.json"
    saved = json.loads(path.read_text())
    assert len(saved["finished"]) == 28  # 8 untrained rows, 10 trained rows x 2 seeds
    dropped = "teacher, 4 DDIM steps"
    del saved["finished"][dropped]
    path.write_text(json.dumps(saved))
    pngs = {p: p.stat().st_mtime_ns for p in (out / "eval_images").glob("*.png")}
    capsys.readouterr()
    result = digits_fast.main(["--out", str(out), *args])
    assert "resuming: 27 of 28 rows" in capsys.readouterr().out
    again = json.loads(path.read_text())
    assert len(again["finished"]) == 28 and dropped in again["finished"]
    assert again["verdicts"] == saved["verdicts"]
    assert [r["fid"] for r in result["glance"]] == [r["fid"] for r in saved["glance"]]
    redrawn = [p.name for p, t in pngs.items() if p.stat().st_mtime_ns != t]
    assert redrawn == ["fast__teacher_4_ddim_steps.png"]  # only the dropped row was sampled again
    with pytest.raises(TsmError, match="other settings"):  # finished rows of other settings are not mixed in
        digits_fast.main(["--out", str(out), *args, "--updates", "3"])
