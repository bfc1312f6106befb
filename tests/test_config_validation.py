"""Config values a newcomer types that used to be accepted (and train nothing) or crash deep inside torch:
each is refused by `load_config` in one line naming the key; YAML's bare `no` is read as the word."""

from __future__ import annotations

import pytest

from tsm.config import load_config
from tsm.errors import TsmError


@pytest.mark.parametrize("text", ["no", "'no'", "bf16"])
def test_mixed_precision_takes_the_bare_word_no(tmp_path, text):
    # YAML 1.1 reads a bare `no` as false, in a file and in a key=value override alike
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  mixed_precision: {text}\n")
    want = text.strip("'")
    assert load_config(cfg).train.mixed_precision == want
    assert load_config(None, [f"train.mixed_precision={text}"]).train.mixed_precision == want


def test_mixed_precision_still_refuses_other_booleans():
    with pytest.raises(TsmError, match="mixed_precision must be no, bf16 or fp16, got 'yes'"):
        load_config(None, ["train.mixed_precision=yes"])
    with pytest.raises(TsmError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=fp32"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr must be a positive number, got -1.0"),
        ("optim.lr=0", "optim.lr must be a positive number, got 0.0"),
        ("optim.lr=.nan", "optim.lr must be a positive number, got nan"),
        ("optim.text_lr=-1e-4", "optim.text_lr must be a positive number"),
        ("distill.fake_lr=0", "distill.fake_lr must be a positive number"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0"),
        ("experts.rank=0", "experts.rank must be >= 1, got 0"),
        ("experts.alpha=-4", "experts.alpha must be > 0"),
        ("experts.dropout=1", "experts.dropout must be in [0, 1)"),
        ("data.resolution=0", "data.resolution must be a positive number of pixels"),
        ("data.caption_dropout=1.5", "data.caption_dropout must be in [0, 1]"),
        ("train.validation_steps=0", "train.validation_steps must be >= 1"),
        ("train.validate_every=-5", "train.validate_every must be >= 0"),
    ],
)
def test_values_that_train_nothing_are_refused_in_one_line(override, message):
    with pytest.raises(TsmError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_defaults_and_the_edges_pass():
    cfg = load_config(
        None, ["optim.lr=1e-6", "optim.weight_decay=0", "optim.max_grad_norm=null", "experts.dropout=0.5"]
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.0, None)
    assert cfg.experts.dropout == 0.5
