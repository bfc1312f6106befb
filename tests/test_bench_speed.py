"""The speed benchmarks run end to end at toy sizes (no timing assertions)."""

import dataclasses
import json
import math

from tsm.bench import speed, train_speed


def test_speed_benchmark_at_a_toy_size(tmp_path, monkeypatch, capsys):
    toy = dataclasses.replace(speed.TINY, latent=8, batch=2, text_len=4, quick_repeats=1)
    monkeypatch.setattr(speed, "TINY", toy)
    for big in ("SD_CPU", "SD_GPU"):  # the second model main times: the one for this machine
        monkeypatch.setattr(speed, big, dataclasses.replace(toy, name="toy-2"))
    monkeypatch.setattr(speed, "MID", dataclasses.replace(toy, name="toy-mid"))
    monkeypatch.setattr(speed, "SAMPLING_STEPS", 3)
    rows = speed.main(["--quick", "--json", str(tmp_path / "speed.json")])
    table = capsys.readouterr().out

    assert len(rows) == 2 * 7 + 6
    assert [r.model for r in rows[-6:]] == ["toy-mid"] * 6
    assert "smooth routing" in rows[-3].measurement and rows[-5].target == 1.02
    for row in rows:
        assert math.isfinite(row.ratio) and row.ratio > 0, row
        assert row.ok in ("yes", "NO", "—")
        assert f"| {row.model} | {row.measurement} |" in table
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert [r["measurement"] for r in saved["rows"]] == [r.measurement for r in rows]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in saved["rows"])
    only = speed.main(["--quick", "--sampling-only"])
    assert [r.measurement for r in only] == [r.measurement for r in rows[-6:]]


def test_train_speed_benchmark_at_a_toy_size(tmp_path, capsys):
    table = train_speed.main(["--steps", "2", "--batch", "4", "--json", str(tmp_path / "t.json")])
    assert [r["run"] for r in table][0].startswith("diffusers")
    assert all(math.isfinite(r["it_per_s"]) and r["it_per_s"] > 0 for r in table)
    assert table[0]["vs_diffusers"] == 1.0
    assert "| tsm train method=foster" in capsys.readouterr().out
