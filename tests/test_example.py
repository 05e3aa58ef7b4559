"""The main job runs end to end on CPU and fuses every instance in its model."""

from __future__ import annotations

import math

import pytest

from examples.train_small_lm import main
from patterns.blocks import LMConfig, TinyLM


def test_main_job_trains_and_fuses_everything():
    result = main(["--steps", "4", "--batch", "2", "--seq", "32", "--dim", "32", "--device", "cpu"])
    expected = TinyLM(LMConfig(dim=32)).expected_fusions()
    assert result["fusions"] == expected
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["step_ms"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dim", "30"], "not divisible by heads"),
        (["--heads", "4", "--kv-heads", "3"], "not a multiple"),
    ],
)
def test_main_job_rejects_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value)


def test_main_job_rejects_unknown_device():
    with pytest.raises(SystemExit):
        main(["--device", "tpu"])
