"""Progress as each place reads it: bars in a terminal or a notebook, a few lines in a log."""

import numpy as np
import pytest
import torch
from helpers import params

from transfer_study.core.progress import VARIABLE, bars, progress
from transfer_study.core.stage import UserError
from transfer_study.featurize import featurize
from transfer_study.train.fit import train_model
from transfer_study.train.live import StreamedBar, progress_bar_callbacks


class MeanColour(torch.nn.Module):
    """A stand-in backbone: each image's mean colour, 3 features."""

    def forward(self, images):
        return images.float().mean(dim=(2, 3))


def featurize_output(tmp_path, capsys, images=1000):
    """What featurize printed on stderr over `images` tiny images, batches of 32."""
    pixels = np.random.default_rng(0).integers(0, 256, (images, 3, 4, 4), dtype=np.uint8)
    featurize(MeanColour(), pixels, tmp_path / "f.npy", 3, torch.device("cpu"), desc="m train")
    assert np.load(tmp_path / "f.npy").shape == (images, 3)
    return capsys.readouterr().err


def test_in_a_log_featurize_prints_a_line_a_tenth_and_no_carriage_return(tmp_path, capsys):
    # Under pytest stdout and stderr are not terminals: the mode is lines, as in a log file.
    err = featurize_output(tmp_path, capsys)
    lines = err.splitlines()
    assert "\r" not in err and 9 <= len(lines) <= 10  # 32 batches: one line per tenth crossed
    assert all(line.startswith("m train: ") and "img/s" in line for line in lines)
    assert lines[-1].startswith("m train: 100% (1000/1000 img)")


def test_bars_redraw_in_place_when_asked_for_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(VARIABLE, "bar")  # as the notebook asks: it renders carriage returns
    err = featurize_output(tmp_path, capsys)
    # Redrawn in place: every update starts with a carriage return, and one line ends them.
    assert err.count("\r") >= 2 and err.count("\n") == 1 and "| 1000/1000 [" in err
    show, callbacks = progress_bar_callbacks()  # Rich draws nothing off a terminal: tqdm's bar
    assert show and [type(c) for c in callbacks] == [StreamedBar]


def test_lines_leave_lightning_without_a_bar(monkeypatch):
    monkeypatch.setenv(VARIABLE, "lines")
    assert progress_bar_callbacks() == (False, [])


@pytest.mark.parametrize("value", ["bars", "", "x" * 500])
def test_a_bad_progress_variable_is_one_line_naming_it(monkeypatch, value):
    monkeypatch.setenv(VARIABLE, value)
    with pytest.raises(UserError, match=f"^environment variable {VARIABLE} = .*accepts auto, bar"):
        bars()
    with pytest.raises(UserError) as error:
        bars()
    assert "\n" not in str(error.value) and len(str(error.value)) < 150


def test_a_download_of_unknown_size_gets_one_line_at_its_end(capsys):
    with progress(None, "download x.tar.gz", unit="B", unit_scale=True) as bar:
        for _ in range(50):
            bar.update(1 << 20)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("download x.tar.gz: 52.4MB ") and "B/s" in line


def test_training_in_a_notebook_draws_the_train_bar_alone_a_few_times(
    workdir, archive, capsys, monkeypatch
):
    monkeypatch.setenv(VARIABLE, "bar")
    train_model("mlp", params(archive, train={"max_epochs": 3, "patience": 3, "batch_size": 8}))
    out = capsys.readouterr().out
    assert "Epoch 2: 100%" in out  # the last of 3 epochs, to its end
    assert "Validation" not in out and "Sanity" not in out  # nested bars: lines of their own
    # 15 batches an epoch: drawn when it starts, at most twice a second, at its end, and with
    # each epoch's metrics; not once a batch.
    assert out.count("\r") < 3 * 15
