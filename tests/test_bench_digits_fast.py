"""The few-step digits rows run end to end at a toy budget and write their table."""

import json

from tsm.bench import digits_fast
from tsm.bench.digits_model import pretrain_base


def test_few_step_rows_at_a_toy_budget(tmp_path):
    base = pretrain_base(tmp_path / "base", steps=2, batch=8, progress=False)
    args = ["--out", str(tmp_path / "out"), "--base", str(base), "--updates", "2", "--batch", "2"]
    result = digits_fast.main(
        [*args, "--glance-steps", "2", "--per-prompt", "1", "--threads", "1", "--teacher-steps", "5"]
    )
    names = [r["name"] for r in result["distill"]] + [r["name"] for r in result["glance"]]
    assert "4-step TSM 2-stage" in names and "Glance + router, 10 pairs" in names
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["distill"]) == 6 and len(saved["glance"]) == 7
    md = (tmp_path / "out" / "results.md").read_text()
    assert "÷ teacher (first row)" in md and all(n in md for n in names)
    assert all(r["sample_seconds"] > 0 and r["fid"] == r["fid"] for r in saved["distill"] + saved["glance"])
    assert len(list((tmp_path / "out" / "eval_images").glob("*.png"))) == len(set(names))
