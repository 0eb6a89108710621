"""The search loop: Optuna proposes a trial, DVC runs it as a named experiment in a temporary
copy of the project (the workspace is never touched), and the kept epoch's val accuracy is told
back. Optuna's journal beside the project records every trial, finished, failed or interrupted,
so that the same command resumes where a stopped search left off."""

import json
import re
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from transfer_study import experiments
from transfer_study.core import paths
from transfer_study.core.atomic import write_text
from transfer_study.core.stage import shown
from transfer_study.tune.figures import plot_history, plot_importances
from transfer_study.tune.space import SearchError

SEARCH_DIR = Path("search")  # search files; each search's record and results in <name>/
MAX_SUMMARY_BYTES = 1 << 16  # a DVCLive summary is a few hundred bytes
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")  # becomes experiment names: git ref names


def run_search(search, name, trials, run_trial=None):
    """Run `search` as `name` until `trials` trials have ended (finished or failed), resuming
    the record of an earlier run of that name. `run_trial(experiment, overrides)` returns the
    val accuracy, or raises TrialFailed, and `run_trial.test_accuracy(experiment)` gives the
    best trial's test accuracy; by default (DvcTrial) a trial is a DVC experiment. Returns the
    Optuna study."""
    if not NAME.fullmatch(name):
        raise SearchError(
            f"search name {shown(name)}: lowercase letters, digits, - and _, at most 48 "
            "characters (it names the experiments; --name gives another)"
        )
    run_trial = run_trial or DvcTrial(search.model)
    folder = SEARCH_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    study = _study(search, name, folder)
    started = time.monotonic()
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in interrupted:  # stopped last time before its result was told: run it again
        print(f"trial {frozen.number + 1} was interrupted: running it again")
        # Optuna's handle on a trial its record holds, as its own code makes one.
        _run(search, study, name, optuna.trial.Trial(study, frozen._trial_id), run_trial, trials)
    while _ended(study) < trials:
        study.sampler = search.sampler(len(study.trials))
        _run(search, study, name, study.ask(search.distributions()), run_trial, trials)
    _report(search, study, name, folder, time.monotonic() - started, run_trial)
    return study


def describe(search, name, trials):
    """What the search will do, said before its first trial: above all, what each trial reruns,
    and how many backbone passes a featurize key costs."""
    settings = search.settings
    sampler = "TPE" if settings.sampler == "tpe" else "random search"
    lines = [
        f"search {name}: {trials} trials of {sampler} (seed {settings.seed}) over "
        f"{', '.join(k.removeprefix('++') for k in search.space)}, maximizing {search.model}'s "
        "val accuracy (the kept epoch's)",
        f"each trial is a DVC experiment ({name}-1, {name}-2, ...) and reruns "
        f"{', '.join(search.reruns)}",
    ]
    for stage in (s for s in search.reruns if s.startswith("featurize_")):
        lines.append(
            f"note: {stage} reruns for each new value of its keys: up to {trials} backbone "
            "passes over every split, the slow part of a study (values seen before come back "
            "from DVC's run cache)"
        )
    return "\n".join(lines)


class TrialFailed(Exception):
    """A trial that gave no val accuracy: its line says why."""


def _study(search, name, folder):
    """The search's Optuna study, loaded from its journal if it has one. A journal of another
    space, seed, model or baseline commit cannot be continued: its trials would mean something
    else."""
    journal = folder / "journal.log"
    try:
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        )
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not Optuna's journal
        raise SearchError(
            f"{journal} is damaged ({type(error).__name__}): remove {folder} to start the "
            "search over"
        ) from None
    record = {"search": search.fingerprint(), "baseline": _head()}
    if not study.trials and not study.user_attrs:
        clashing = sorted(e for e in experiments.experiment_names() if _is_trial(name, e))
        if clashing:
            listed = ", ".join(clashing[:3]) + (", ..." if len(clashing) > 3 else "")
            raise SearchError(
                f"experiments {listed} exist, but no record of search {name} does ({journal}): "
                "remove them (dvc exp remove) or name another search (--name)"
            )
        for key, value in record.items():
            study.set_user_attr(key, value)
    for key, value in record.items():
        if study.user_attrs.get(key) != value:
            what = "space, model, seed or sampler" if key == "search" else "baseline commit"
            raise SearchError(
                f"search {name} was started with another {what} ({journal}): name a "
                f"new search (--name), or remove {folder} to start it over"
            )
    return study


def _head():
    command = ["git", "rev-parse", "HEAD"]
    return subprocess.run(command, capture_output=True, text=True).stdout.strip()


def _is_trial(name, experiment):
    """Whether `experiment` is named as trials of search `name` are."""
    return re.fullmatch(rf"{re.escape(name)}-\d+", experiment) is not None


def _ended(study):
    return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)


def _run(search, study, name, trial, run_trial, trials):
    """Run `trial` with the values Optuna proposed, and tell the study how it ended."""
    number = trial.number
    experiment = f"{name}-{number + 1}"
    settings = search.overrides(trial.params)
    values = ", ".join(f"{key.removeprefix('++')}={value}" for key, value in settings.items())
    print(f"\n=== trial {number + 1}/{trials} ({experiment}): {values}", flush=True)
    started = time.monotonic()
    try:
        value = run_trial(experiment, settings)
    except TrialFailed as failure:
        seconds = time.monotonic() - started
        trial.set_user_attr("seconds", round(seconds, 1))
        trial.set_user_attr("error", str(failure))
        study.tell(trial, state=TrialState.FAIL)
        print(f"=== trial {number + 1} failed after {seconds:.0f} s: {failure}", flush=True)
        if search.settings.on_failure == "stop":
            raise SearchError(
                f"trial {number + 1} failed ({failure}); stopping, as on_failure: stop asks"
            ) from None
        return
    seconds = time.monotonic() - started
    trial.set_user_attr("seconds", round(seconds, 1))
    trial.set_user_attr("experiment", experiment)
    study.tell(trial, value)
    best = study.best_trial
    print(
        f"=== trial {number + 1}: val accuracy {value:.4f} in {seconds:.0f} s (best "
        f"{best.value:.4f}, trial {best.number + 1})",
        flush=True,
    )


class DvcTrial:
    """A trial as `dvc exp run --temp -n EXPERIMENT -S ...`: the study's stages that the
    settings touch rerun in a temporary copy of the project, and the experiment is kept under
    HEAD like any other. Its value is the kept epoch's val accuracy of `model`, never a test
    figure."""

    def __init__(self, model):
        self.model = model

    def __call__(self, experiment, settings):
        if experiment not in experiments.experiment_names():  # else: it ran before a stop
            command = ["exp", "run", "--temp", "-n", experiment, *experiments.copied_results()]
            status, printed = experiments.stream([*command, *experiments.overrides(settings)], True)
            if status != 0:
                raise TrialFailed(_last_error(printed) or f"dvc exp run exited with {status}")
        return self._figure(paths.live_summary(self.model), experiment, "val", "acc")

    def test_accuracy(self, experiment):
        return self._figure(paths.EVALUATE_METRICS, experiment, self.model, "test_accuracy")

    @staticmethod
    def _figure(path, experiment, *keys):
        """A number in a metrics file as `experiment` holds it."""
        import dvc.api
        from dvc.exceptions import DvcException

        try:
            value = json.loads(dvc.api.read(str(path), rev=experiment))
            for key in keys:
                value = value[key]
            return float(value)
        except (DvcException, OSError, ValueError, KeyError, TypeError) as error:
            raise TrialFailed(f"no {'.'.join(keys)} in {path} of {experiment} ({error})") from None


def _last_error(printed):
    """The last line of a failed run's output that says what went wrong."""
    lines = [line.strip() for line in printed.splitlines()]
    errors = [line for line in lines if line.lower().startswith("error")]
    return errors[-1] if errors else None


def trial_table(search, study):
    """One row per trial: its experiment, state, values, val accuracy and seconds."""
    rows = []
    for trial in study.trials:
        values = search.values(trial.params) if trial.params else {}
        rows.append(
            {
                "trial": trial.number + 1,
                "experiment": trial.user_attrs.get("experiment", ""),
                "state": trial.state.name.lower(),
                **{key.removeprefix("++"): _cell(values.get(key)) for key in search.space},
                "val_accuracy": trial.value,
                "seconds": trial.user_attrs.get("seconds"),
                "error": trial.user_attrs.get("error", ""),
            }
        )
    return pd.DataFrame(rows).set_index("trial")


def _cell(value):
    return json.dumps(value) if isinstance(value, list | dict) else value


def _workspace_val_accuracy(model):
    """The kept epoch's val accuracy in the workspace's DVCLive summary of `model`, if it holds
    one (none before a first run, or for a model left out)."""
    try:
        with open(paths.live_summary(model), "rb") as file:
            return float(json.loads(file.read(MAX_SUMMARY_BYTES))["val"]["acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _report(search, study, name, folder, seconds, run_trial):
    """The trial table (printed, and folder/trials.csv), the two plots, and the best trial:
    its val accuracy, its test accuracy read once here, and how to make it the workspace."""
    table = trial_table(search, study)
    write_text(folder / "trials.csv", table.to_csv())
    print(f"\n{table.drop(columns='error').to_string(float_format='{:.4g}'.format)}")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise SearchError(f"no trial of search {name} finished: {folder}/trials.csv says why")
    own = _workspace_val_accuracy(search.model)  # the params it started from: a yardstick
    plot_history(study, folder / "history.png", f"{name}: {search.model} val accuracy", own)
    plot_importances(study, folder / "importance.png")
    each = table["seconds"].mean()
    rate = f", {3600 / each:.0f} trials an hour ({each:.0f} s each)" if each > 0 else ""
    print(
        f"\n{len(done)} of {len(table)} trials finished{rate}; this run took {seconds / 60:.1f} "
        f"min. Table and plots: {folder}/"
    )
    if own is not None:
        print(f"the workspace's {search.model} (params.yaml as it is): val accuracy {own:.4f}")
    best = study.best_trial
    experiment = best.user_attrs["experiment"]
    try:
        tested = f"{run_trial.test_accuracy(experiment):.4f}"
    except TrialFailed as failure:
        tested = f"unreadable: {failure}"
    print(
        f"best: {experiment}, val accuracy {best.value:.4f} (its test accuracy, read once here: "
        f"{tested})\nmake it the workspace: dvc exp apply {experiment}"
    )
