"""The few-step digits rows run end to end at a toy budget and write their table."""

import json

from tsm.bench import digits
from tsm.bench.digits_model import pretrain_base


def test_few_step_rows_at_a_toy_budget(tmp_path):
    base = pretrain_base(tmp_path / "base", steps=2, batch=8, progress=False)
    args = ["--few-step", "--out", str(tmp_path), "--base", str(base), "--updates", "2", "--batch", "2"]
    result = digits.main(  # `tsm bench digits --few-step` runs `tsm bench digits-fast` into OUT/fast
        [
            *args,
            "--glance-steps",
            "2",
            "--per-prompt",
            "1",
            "--threads",
            "1",
            "--teacher-steps",
            "5",
            "--seeds",
            "0",
            "1",
        ]
    )
    names = [r["name"] for r in result["distill"]] + [r["name"] for r in result["glance"]]
    assert "4-step TSM 2-stage" in names and "Glance + router, 10 pairs" in names
    saved = json.loads((tmp_path / "fast" / "results.json").read_text())
    assert len(saved["distill"]) == 7 and len(saved["glance"]) == 7
    md = (tmp_path / "fast" / "results.md").read_text()
    assert "÷ teacher (first row)" in md and all(n in md for n in names)
    assert all(r["sample_seconds"] > 0 and r["fid"] == r["fid"] for r in saved["distill"] + saved["glance"])
    trained = [r for r in saved["distill"] + saved["glance"] if "train_seconds" in r]
    assert len(trained) == 8 and all(r["seeds"] == 2 and len(r["per_seed"]) == 2 for r in trained)
    for r in trained:  # the row is the mean of its seeds
        assert abs(r["fid"] - sum(p["fid"] for p in r["per_seed"]) / 2) < 1e-6
    assert "±" in md
    # one PNG per untrained row (the teacher rows are shared by both tables), one per seed of a trained row
    untrained = {r["name"] for r in saved["distill"] + saved["glance"] if "train_seconds" not in r}
    assert len(list((tmp_path / "fast" / "eval_images").glob("*.png"))) == len(untrained) + 2 * len(trained)
