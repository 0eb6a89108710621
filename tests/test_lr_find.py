"""The lr finder: a sweep over a model's training inputs, its curve, its suggestion as -S."""

import hashlib

import pytest
from helpers import STUDY, tiny_overrides, write_params

from transfer_study.__main__ import main
from transfer_study.core import paths
from transfer_study.core.params_file import deep_merge
from transfer_study.core.stage import UserError
from transfer_study.lr_find import LrSweep, check_range, plot_sweep, sweep_lr


def _digest(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["vgg16", "mlp"])  # a head on cached features; pixels
def test_the_suggestion_lies_inside_the_swept_range_and_nothing_is_written(study, name):
    kept = {path: _digest(path) for path in (paths.model_file(name), paths.history_file(name))}
    sweep = sweep_lr(name, study.params, 1e-5, 1.0, steps=30)
    assert 13 <= len(sweep.lrs) == len(sweep.losses) <= 30  # 10 first and the last are skipped
    assert sweep.lrs == sorted(sweep.lrs) and 1e-5 <= sweep.lrs[0] < sweep.lrs[-1] <= 1.0
    assert sweep.suggested in sweep.lrs
    assert {path: _digest(path) for path in kept} == kept


def test_the_curve_is_a_png_and_the_suggestion_a_dvc_override(study, capsys):
    write_params(study.root / "params.yaml", deep_merge(tiny_overrides(study.archive), STUDY))
    main(["lr-find", "vgg16", "--steps", "25", "--plot", "curve.png"])
    out = capsys.readouterr().out
    assert (study.root / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested lr: " in out
    # The repository's params.yaml gives vgg16 an empty train section: DVC needs ++ to add lr.
    assert "dvc exp run -S ++vgg16.train.lr=" in out.splitlines()[-1]


@pytest.mark.parametrize(
    ("name", "message"),
    [("lite0", "lite0 is not in the study: set models.lite0: true"), ("vgg61", "unknown model")],
)
def test_a_model_left_out_or_unknown_is_one_line(study, name, message):
    with pytest.raises(UserError, match=message):
        sweep_lr(name, study.params, 1e-5, 1.0, steps=30)


@pytest.mark.parametrize(("low", "high"), [(1e-3, 1e-4), (0.0, 1.0), (1e-5, float("inf"))])
def test_a_range_that_is_not_one_is_refused(low, high):
    with pytest.raises(UserError, match="need 0 < min < max < inf"):
        check_range(low, high)


def test_the_plot_marks_no_suggestion_when_there_is_none(tmp_path):
    plot_sweep(LrSweep([1e-4, 1e-3], [2.3, 2.2], None), "mlp", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
