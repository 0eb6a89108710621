"""A search's two plots: the best val accuracy so far against trials, and which keys mattered."""

import warnings

import optuna
from matplotlib.figure import Figure  # a figure of its own: no pyplot, no display
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from transfer_study.core.atomic import atomic_path


def plot_history(study, path, title, workspace=None):
    """Each finished trial's val accuracy, and the best so far as a step line; failed trials as
    crosses on the axis; the workspace's own val accuracy (`workspace`), if known, as a dashed
    line to beat."""
    figure = Figure(figsize=(6.5, 4))
    axis = figure.subplots()
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    numbers = [t.number + 1 for t in done]
    values = [t.value for t in done]
    best = [max(values[: i + 1]) for i in range(len(values))]
    axis.plot(numbers, values, "o", alpha=0.6, label="trial")
    axis.step(numbers, best, where="post", color="C1", label="best so far")
    failed = [t.number + 1 for t in study.trials if t.state == TrialState.FAIL]
    if failed:
        axis.plot(failed, [min(values)] * len(failed), "x", color="C3", label="failed")
    if workspace is not None:
        axis.axhline(workspace, color="grey", linestyle="--", label="params.yaml as it is")
    axis.set(xlabel="trial", ylabel="val accuracy (kept epoch)", title=title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    _save(figure, path)


TOP_SHARE = 0.25  # what importance explains: reaching the best quarter of the finished trials


def plot_importances(study, path):
    """How much reaching the best quarter of the trials depended on each key, as bars: Optuna's
    PED-ANOVA, which needs no further library (its fANOVA needs scikit-learn)."""
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=TOP_SHARE)
    with warnings.catch_warnings(record=True) as raised:  # too few trials: all equal, it warns
        warnings.simplefilter("always")
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    keys = list(importances)[::-1]  # the most important on top
    finished = sum(t.state == TrialState.COMPLETE for t in study.trials)
    figure = Figure(figsize=(6.5, 0.6 * len(keys) + 1.5))
    axis = figure.subplots()
    axis.barh([k.removeprefix("++") for k in keys], [importances[k] for k in keys])
    axis.set(
        xlabel=f"importance for reaching the best {TOP_SHARE:.0%} of trials (PED-ANOVA)",
        title=f"Which keys mattered ({finished} trials"
        + ("; too few to tell them apart)" if raised else ")"),
    )
    axis.grid(axis="x", alpha=0.3)
    _save(figure, path)


def _save(figure, path):
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)
