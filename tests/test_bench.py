"""The benchmark runs end to end at CI size; its figures are printed, never asserted."""

import json

from transfer_study.bench import main


def test_bench_prints_the_ratio_keys_last(capsys):
    summary = main(["--images", "48", "--image-size", "32", "--backbones", "vgg16"])
    assert {
        "vgg16_6epoch_speedup",
        "head_epoch_speedup",
        "featurize_speedup",
        "mlp_epoch_speedup",
        "device",
    } <= summary.keys()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
