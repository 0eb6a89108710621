"""The search (transfer-study tune): its file refused in one line when wrong, the same seed
proposing the same trials, a stopped search resumed without repeating a trial, failed trials
recorded as failed; and, end to end on the tiny study, each trial a DVC experiment scored on
val accuracy that reruns no featurize stage and leaves the workspace as it was."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from helpers import REPO, background_fixtures, finished, needs, reproduced, run, stages_run

from transfer_study.__main__ import main
from transfer_study.tune.search import TrialFailed, run_search, trial_table
from transfer_study.tune.space import SearchError, load_search

HEAD_SPACE = {  # VGG16's head, on cached features
    "model": "vgg16",
    "trials": 6,
    "seed": 3,
    "startup_trials": 2,
    "space": {
        "vgg16.train.lr": {"log": [1e-4, 1e-1]},
        "vgg16.head.dropout": {"float": [0.0, 0.5]},
        "vgg16.head.hidden": {"choice": [[16], [32, 16]]},
        "vgg16.train.max_epochs": {"int": [1, 3]},
    },
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the repository's params.yaml and dvc.yaml, the working folder."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(f"{REPO}/{name}", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def search_file(folder, spec, name="head.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


class Fake:
    """A trial without DVC: a smooth score of the proposed values, each call recorded; it fails
    or is interrupted at the calls listed."""

    def __init__(self, fail_at=(), interrupt_at=()):
        self.calls = []
        self.fail_at, self.interrupt_at = fail_at, interrupt_at

    def __call__(self, experiment, settings):
        self.calls.append((experiment, settings))
        if len(self.calls) in self.interrupt_at:
            raise KeyboardInterrupt
        if len(self.calls) in self.fail_at:
            raise TrialFailed("error: the stage crashed")
        lr = settings["++vgg16.train.lr"]
        return 0.9 - (math.log10(lr) + 2.5) ** 2 / 10 - settings["vgg16.head.dropout"] / 10

    def test_accuracy(self, experiment):
        return 0.5


def proposals(study):
    return [trial.params for trial in study.trials]


BAD = [
    (
        {"space": {"vgg16.head.units": {"float": [0, 1]}}},
        "space vgg16.head.units = 0.0: unknown key",
    ),
    ({"space": {"vgg16.head.dropout": {"float": [0.5, 0.1]}}}, "[0.5, 0.1] is empty or inverted"),
    ({"space": {"vgg16.head.dropout": {"float": [0.3, 0.3]}}}, "[0.3, 0.3] is empty or inverted"),
    ({"space": {"vgg16.train.lr": {"log": [0, 0.1]}}}, "must lie above 0 (a log scale)"),
    ({"space": {"vgg16.head.hidden": {"choice": []}}}, "choice: an empty list"),
    ({"space": {"vgg16.head.hidden": {"choice": ["wide", [8]]}}}, "hidden: expected a list"),
    ({"space": {"vgg16.head.dropout": [0, 0.5]}}, "expected one of {float: ...}"),
    ({"model": "lite1"}, "model lite1 is switched off (models.lite1: false"),
    ({"model": "vgg"}, "model 'vgg' is not in params.yaml (valid: mlp, vgg16,"),
    ({"space": {"mlp.dropout": {"float": [0, 0.5]}}}, "changes nothing vgg16 trains on"),
    ({"space": {"data.val_fraction": {"float": [0.1, 0.3]}}}, "reruns the split"),
    ({"trails": 3}, "unknown key 'trails' (valid: model, trials,"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_a_bad_search_file_is_refused_in_one_line(project, capsys, change, message):
    path = search_file(project, {**HEAD_SPACE, **change})
    with pytest.raises(SystemExit) as stop:
        main(["tune", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
    assert message in err


def test_keys_absent_from_params_yaml_get_dvc_s_plus_plus(project):
    search = load_search(search_file(project, HEAD_SPACE))
    chosen = search.overrides({**HEAD_SPACE["space"], "vgg16.head.hidden": "[32, 16]"})
    # vgg16.train is {} in params.yaml: DVC adds its lr and max_epochs only with ++.
    assert set(chosen) == {
        "++vgg16.train.lr",
        "vgg16.head.dropout",
        "vgg16.head.hidden",
        "++vgg16.train.max_epochs",
    }
    assert chosen["vgg16.head.hidden"] == [32, 16]  # the choice itself, not Optuna's text
    assert search.reruns == ["train_vgg16", "evaluate", "report"]


def test_a_featurize_key_says_the_backbone_passes_it_costs(project, capsys):
    spec = {**HEAD_SPACE, "space": {"vgg16.image_size": {"choice": [32, 64]}}}
    search = load_search(search_file(project, spec))
    assert search.reruns == ["featurize_vgg16", "train_vgg16", "evaluate", "report"]
    from transfer_study.tune.search import describe

    assert "note: featurize_vgg16 reruns for each new value" in describe(search, "s", 6)


def test_the_same_seed_proposes_the_same_trials(project):
    search = load_search(search_file(project, HEAD_SPACE))
    first = run_search(search, "first", 6, Fake())
    again = run_search(search, "again", 6, Fake())
    other = run_search(load_search(search_file(project, {**HEAD_SPACE, "seed": 4})), "o", 6, Fake())
    assert proposals(first) == proposals(again)
    assert proposals(first) != proposals(other)
    # TPE took over after the 2 random trials: it proposes nearer the fake's best lr (10^-2.5).
    lrs = [abs(math.log10(p["vgg16.train.lr"]) + 2.5) for p in proposals(first)]
    assert min(lrs[2:]) < min(lrs[:2])


def test_a_stopped_search_resumes_without_repeating_a_trial(project, capsys):
    search = load_search(search_file(project, HEAD_SPACE))
    whole = run_search(search, "whole", 6, Fake())
    stopped = Fake(interrupt_at=(3,))
    with pytest.raises(KeyboardInterrupt):
        run_search(search, "stopped", 6, stopped)
    resumed = Fake()
    study = run_search(search, "stopped", 6, resumed)
    assert "trial 3 was interrupted: running it again" in capsys.readouterr().out
    # Trials 1 and 2 ran once; trial 3 again, with the values it had; then 4 to 6.
    assert [e for e, _ in stopped.calls] == ["stopped-1", "stopped-2", "stopped-3"]
    assert [e for e, _ in resumed.calls] == [f"stopped-{k}" for k in range(3, 7)]
    assert resumed.calls[0][1] == stopped.calls[2][1]
    assert proposals(study) == proposals(whole)  # as if it had never stopped
    table = trial_table(search, study)
    assert list(table["state"]) == ["complete"] * 6
    assert (project / "search/stopped/history.png").exists()
    assert (project / "search/stopped/importance.png").exists()


def test_a_failed_trial_is_recorded_as_failed_and_the_search_goes_on(project):
    search = load_search(search_file(project, HEAD_SPACE))
    study = run_search(search, "failing", 4, Fake(fail_at=(2,)))
    table = trial_table(search, study)
    assert list(table["state"]) == ["complete", "fail", "complete", "complete"]
    assert math.isnan(table.loc[2, "val_accuracy"])  # a failure is not a score
    assert table.loc[2, "error"] == "error: the stage crashed"
    written = (project / "search/failing/trials.csv").read_text()
    assert "error: the stage crashed" in written


def test_a_failed_trial_stops_the_search_if_asked(project):
    search = load_search(search_file(project, {**HEAD_SPACE, "on_failure": "stop"}))
    with pytest.raises(SearchError, match=r"trial 2 failed \(error: the stage crashed\); stopping"):
        run_search(search, "stopping", 4, Fake(fail_at=(2,)))


def test_a_record_of_another_space_is_not_continued(project):
    run_search(load_search(search_file(project, HEAD_SPACE)), "kept", 2, Fake())
    wider = {
        **HEAD_SPACE,
        "space": {**HEAD_SPACE["space"], "vgg16.head.dropout": {"float": [0, 0.6]}},
    }
    with pytest.raises(SearchError, match="search kept was started with another space"):
        run_search(load_search(search_file(project, wider)), "kept", 4, Fake())


# End to end: a search over VGG16's head in a copy of the reproduced tiny study (its results
# committed), run as a user runs it: 1 trial, then a second interrupted like Ctrl+C in its
# terminal, then the same command again.
E2E_SPACE = {
    "model": "vgg16",
    "trials": 2,
    "seed": 0,
    "startup_trials": 1,
    "space": {"vgg16.train.lr": {"log": [1e-3, 1e-1]}, "vgg16.head.dropout": {"float": [0, 0.5]}},
}


@needs("reproduced")
def searched(runs):
    root = finished(runs, "searched")
    (root / "search").mkdir()
    (root / "search/head.yaml").write_text(yaml.safe_dump(E2E_SPACE))
    before = (root / "params.yaml").read_text()
    tune = [sys.executable, "-m", "transfer_study", "tune", "search/head.yaml"]
    first = run(root, *tune, "--trials", "1")
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "DVC_NO_ANALYTICS": "1"}
    stopped = subprocess.Popen(
        tune,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    printed = []
    for line in stopped.stdout:  # Ctrl+C once trial 2's training has started
        printed.append(line)
        if "Running stage 'train_vgg16'" in line:
            os.killpg(stopped.pid, signal.SIGINT)
            break
    printed.append(stopped.stdout.read())
    stopped.wait(timeout=300)
    resumed = run(root, *tune)
    return {
        "outputs": [first, "".join(printed), resumed],
        "stopped_status": stopped.returncode,
        "params_before": before,
        "params_after": (root / "params.yaml").read_text(),
        "git_status": run(root, "git", "status", "--porcelain"),
        "trials": (root / "search/head/trials.csv").read_text(),
        "plots": [
            (root / f"search/head/{n}.png").read_bytes()[:8].hex()
            for n in ("history", "importance")
        ],
        "shown": json.loads(run(root, "dvc", "exp", "show", "--json")),
    }


RUNS = [reproduced, searched]
globals().update(background_fixtures(RUNS))


def experiments_shown(shown):
    """name -> {params, metrics} of each experiment `dvc exp show --json` lists."""
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            (revision,) = experiment["revs"]
            data = revision["data"]
            found[revision["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "metrics": {path: m["data"] for path, m in data["metrics"].items()},
            }
    return found


def test_each_trial_is_a_dvc_experiment_scored_on_val_accuracy(searched):
    trials = pd.read_csv(io.StringIO(searched["trials"]), index_col="trial")
    shown = experiments_shown(searched["shown"])
    assert list(trials["experiment"]) == ["head-1", "head-2"]
    for _, trial in trials.iterrows():
        experiment = shown[trial["experiment"]]
        vgg16 = experiment["params"]["vgg16"]
        assert vgg16["train"]["lr"] == pytest.approx(trial["vgg16.train.lr"])
        assert vgg16["head"]["dropout"] == pytest.approx(trial["vgg16.head.dropout"])
        # The objective is the kept epoch's val accuracy, as DVCLive wrote it; never test's.
        assert (
            trial["val_accuracy"]
            == experiment["metrics"]["dvclive/vgg16/metrics.json"]["val"]["acc"]
        )
    best = trials["val_accuracy"].idxmax()
    best_name = trials.loc[best, "experiment"]
    tested = shown[best_name]["metrics"]["metrics/evaluate.json"]["vgg16"]["test_accuracy"]
    resumed = searched["outputs"][2]
    assert f"best: {best_name}, val accuracy {trials.loc[best, 'val_accuracy']:.4f}" in resumed
    assert f"its test accuracy, read once here: {tested:.4f}" in resumed
    assert f"dvc exp apply {best_name}" in resumed
    assert searched["plots"] == ["89504e470d0a1a0a"] * 2  # PNGs


def test_a_head_only_search_reruns_no_featurize_stage_and_leaves_the_workspace(searched):
    first, stopped, resumed = searched["outputs"]
    assert (
        "each trial is a DVC experiment (head-1, head-2, ...) and reruns train_vgg16, evaluate, "
        "report" in first
    )
    for output in (first, resumed):
        assert not [
            stage
            for stage in stages_run(output)
            if not stage.startswith(("train_", "evaluate", "report"))
        ]
    assert stages_run(first).count("train_vgg16") == 1
    assert "train_mlp" not in stages_run(first)  # vgg16's own lr: the MLP is not retrained
    assert searched["params_after"] == searched["params_before"]
    # Only the search file is new; its results are git-ignored, and nothing else changed.
    assert searched["git_status"].split() == ["??", "search/"]


def test_an_interrupted_search_resumes_without_repeating_a_trial(searched):
    first, stopped, resumed = searched["outputs"]
    assert searched["stopped_status"] == 130
    assert "interrupted: finished trials are kept; run the same command to go on" in stopped
    assert "=== trial 2/2" in stopped and "=== trial 1/" not in stopped
    assert "trial 2 was interrupted: running it again" in resumed
    assert "=== trial 1/" not in resumed
    assert stages_run(resumed).count("train_vgg16") == 1


def test_the_console_script_offers_predict_lr_find_tune_and_bench(capsys):
    import tomllib

    scripts = tomllib.loads(open(f"{REPO}/pyproject.toml").read())["project"]["scripts"]
    assert scripts == {"transfer-study": "transfer_study.__main__:main"}
    with pytest.raises(SystemExit) as done:
        main(["-h"])
    assert done.value.code == 0
    assert "{bench,tune,lr-find,predict}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # bench: the benchmarks' own arguments
        main(["bench", "cut", "--images", "0"])
    assert refused.value.code == 2
    assert "argument --images: accepts an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [b"\x00\xff garbage\n", b'{"op_code": 0}\n', b"[1, 2]\n"])
def test_a_damaged_record_is_one_line(project, damage):
    (project / "search/broken").mkdir(parents=True)
    (project / "search/broken/journal.log").write_bytes(damage)
    with pytest.raises(SearchError, match="search/broken/journal.log is damaged"):
        run_search(load_search(search_file(project, HEAD_SPACE)), "broken", 2, Fake())
