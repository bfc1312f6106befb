"""The demo and the speed benchmark run end to end at toy sizes (no timing assertions)."""

import dataclasses
import json
import math

from PIL import Image
from safetensors import safe_open

import tsm
from tsm import demo
from tsm.bench import speed


def test_demo_at_a_toy_budget(tmp_path, capsys):
    toy = "--steps 3 --pretrain-steps 3 --batch 16 --eval-size 32".split()
    result = demo.main(["--out", str(tmp_path), *toy])
    out = capsys.readouterr().out

    losses = result["losses"]
    assert len(losses) == 4
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert "TSM 2-stage" in out and str(tmp_path) in out

    files = result["files"]
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in files.values()}
    with Image.open(files["samples"]) as grid:  # 10 x 10 tiles of 8x8 pixels zoomed 4x, 2 px apart
        assert grid.size == (10 * 32 + 9 * 2, 10 * 32 + 9 * 2)
    spec = tsm.read_spec(files["experts"])
    assert spec.scales == (8, 1) and spec.rank == 4
    with safe_open(str(files["core_lora"]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(
        k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )


def test_speed_benchmark_at_a_toy_size(tmp_path, monkeypatch, capsys):
    toy = dataclasses.replace(speed.TINY, latent=8, batch=2, text_len=4, quick_repeats=1)
    monkeypatch.setattr(speed, "TINY", toy)
    for big in ("SD_CPU", "SD_GPU"):  # the second model main times: the one for this machine
        monkeypatch.setattr(speed, big, dataclasses.replace(toy, name="toy-2"))
    rows = speed.main(["--quick", "--json", str(tmp_path / "speed.json")])
    table = capsys.readouterr().out

    assert len(rows) == 2 * 7
    for row in rows:
        assert math.isfinite(row.ratio) and row.ratio > 0, row
        assert row.ok in ("yes", "NO", "—")
        assert f"| {row.model} | {row.measurement} |" in table
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert [r["measurement"] for r in saved["rows"]] == [r.measurement for r in rows]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in saved["rows"])
