"""The report's figures: class names the plot font cannot draw are said once, not as warnings."""

import warnings

import pandas as pd

from transfer_study.report import confusion_plot, missing_glyphs


def test_class_names_the_font_lacks_raise_no_warning(tmp_path):
    classes = ["cat", "猫", "chien🐕"]
    assert missing_glyphs(classes) == ["猫", "🐕"]
    assert missing_glyphs(["cat", "café", "0"]) == []
    predictions = pd.DataFrame({"actual": ["cat", "猫", "chien🐕"], "predicted": ["猫"] * 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion_plot("mlp", predictions, classes, tmp_path / "confusion_mlp.png")
    assert [str(w.message) for w in caught] == []
    assert (tmp_path / "confusion_mlp.png").stat().st_size > 0
