"""A search's file (model, trials, seed, space), checked against params.yaml and dvc.yaml before
any trial: each value the space can take is validated by the params parser itself, and the
stages each key reruns are read from dvc.yaml."""

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from transfer_study.core.config import MAX_SEED, parse_params
from transfer_study.core.params_file import deep_merge, read_params
from transfer_study.core.stage import ParamsError, UserError, shown
from transfer_study.experiments import flat_params, stage_definitions

MAX_TRIALS = 10_000
_KINDS = ("float", "log", "int", "choice")  # a space entry's kinds of values


class SearchError(UserError):
    """A search file that cannot be searched, or a search that cannot go on."""


class Dimension(BaseModel):
    """One key's values: exactly one of a float range, a log-scale range, an integer range or a
    list of choices."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    float_range: tuple[float, float] | None = Field(None, alias="float")
    log: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = None

    @pydantic.model_validator(mode="after")
    def _one_kind(self):
        given = {kind: value for kind, value in self._kinds().items() if value is not None}
        if len(given) != 1:
            raise ValueError(
                "give exactly one of float: [low, high], log: [low, high], int: [low, high] or "
                f"choice: [a, b, ...], got {', '.join(given) or 'none'}"
            )
        ((kind, value),) = given.items()
        if kind == "choice":
            if not value:
                raise ValueError("choice: an empty list; give at least one value")
        elif not value[0] < value[1]:
            raise ValueError(f"{kind}: {list(value)} is empty or inverted; give [low, high]")
        elif kind == "log" and value[0] <= 0:
            raise ValueError(f"log: {list(value)} must lie above 0 (a log scale)")
        return self

    def _kinds(self):
        return {
            "float": self.float_range,
            "log": self.log,
            "int": self.int_range,
            "choice": self.choice,
        }

    def values(self):
        """The values to validate: every choice, or a range's two ends."""
        return self.choice or list(self.float_range or self.log or self.int_range)

    def distribution(self):
        """The Optuna distribution. Choices that are lists or mappings ([256, 64]) are held as
        their JSON text, since Optuna's choices are plain values."""
        if self.choice:
            return optuna.distributions.CategoricalDistribution([_plain(c) for c in self.choice])
        if self.int_range:
            return optuna.distributions.IntDistribution(*self.int_range)
        low, high = self.log or self.float_range
        return optuna.distributions.FloatDistribution(low, high, log=self.log is not None)


def _plain(choice):
    return json.dumps(choice) if isinstance(choice, list | dict) else choice


class SearchFile(BaseModel):
    """What a search file holds; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str  # whose kept epoch's val accuracy is maximized
    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(5, ge=0, le=MAX_TRIALS)  # random ones before TPE models results
    on_failure: Literal["continue", "stop"] = "continue"
    space: dict[str, Dimension] = Field(min_length=1)


class Search:
    """A checked search: its file's settings, the -S arguments of a trial, and what each trial
    reruns."""

    def __init__(self, path, settings, raw_params, stage_params):
        self.path = Path(path)
        self.settings = settings
        self.model = settings.model
        self.space = settings.space
        self._existing = set(flat_params(raw_params))
        self.reruns = _reruns(self, raw_params, stage_params)

    def distributions(self):
        return {key: dimension.distribution() for key, dimension in self.space.items()}

    def values(self, proposed):
        """Optuna's proposal {key: value} as params values (choices' JSON read back)."""
        return {
            key: next(c for c in self.space[key].choice if _plain(c) == value)
            if self.space[key].choice
            else value
            for key, value in proposed.items()
        }

    def overrides(self, proposed):
        """{key: value} for dvc exp run's -S: keys absent from params.yaml get DVC's ++ (adds a
        key), such as a model's own train.lr under `lite0.train: {}`."""
        return {
            (key if key.startswith("++") or _plain_key(key) in self._existing else f"++{key}"): v
            for key, v in self.values(proposed).items()
        }

    def sampler(self, number):
        """The sampler that proposes trial `number`: seeded from the search's seed and the
        number, so that a resumed search proposes what an uninterrupted one would have."""
        seed = int(np.random.SeedSequence([self.settings.seed, number]).generate_state(1)[0])
        if self.settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.settings.startup_trials)

    def fingerprint(self):
        """What a resumed search must share with the one it continues."""
        fields = self.settings.model_dump(
            mode="json", include={"model", "seed", "sampler", "space"}
        )
        return json.dumps({**fields, "startup": self.settings.startup_trials}, sort_keys=True)


def load_search(path, chosen=None, params_path="params.yaml", dvc_yaml="dvc.yaml"):
    """The search file at `path`, with the command line's `chosen` settings ({"trials": 40})
    over its own, checked; anything wrong is one SearchError line."""
    raw = read_params(path)  # bounded, UTF-8, YAML; its errors name the file
    if not isinstance(raw, dict):
        raise SearchError(
            f"{path}: expected a mapping (model, trials, seed, space), got {shown(raw)}"
        )
    try:
        settings = SearchFile.model_validate({**raw, **(chosen or {})})
    except pydantic.ValidationError as error:
        raise SearchError(f"{path}: {_first_problem(error)}") from None
    raw_params = read_params(params_path)
    _check_model(path, settings.model, raw_params)
    for key, dimension in settings.space.items():
        for value in dimension.values():
            try:
                parse_params(deep_merge(raw_params, _nested(_plain_key(key), value)))
            except ParamsError as error:
                raise SearchError(f"{path}: space {key} = {shown(value)}: {error}") from None
    return Search(path, settings, raw_params, _stage_params(dvc_yaml))


def _first_problem(error):
    """pydantic's first error as one line: where, what, and the value given."""
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        fields = SearchFile.model_fields.items()
        valid = [f.alias or n for n, f in fields] if len(problem["loc"]) == 1 else list(_KINDS)
        return f"unknown key {shown(where)} (valid: {', '.join(valid)})"
    if problem["type"] == "model_type":  # a space entry that is not a mapping
        kinds = ", ".join(f"{{{kind}: ...}}" for kind in _KINDS)
        return f"{where}: expected one of {kinds}, got {shown(problem['input'])}"
    if problem["type"] == "missing":
        return f"missing key {where}"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "value_error":
        return f"{where}: {message}"
    return f"{where}: {message} (given {shown(problem.get('input'))})"


def _check_model(path, model, raw_params):
    switches = raw_params.get("models") if isinstance(raw_params, dict) else None
    if not isinstance(switches, dict) or model not in switches:
        valid = ", ".join(switches or {}) if isinstance(switches, dict) else "none"
        raise SearchError(f"{path}: model {shown(model)} is not in params.yaml (valid: {valid})")
    if switches[model] is not True:
        raise SearchError(
            f"{path}: model {model} is switched off (models.{model}: false in params.yaml): "
            f"switch it on (dvc exp run -S models.{model}=true), or search another model"
        )


def _plain_key(key):
    return key.removeprefix("++")


def _nested(key, value):
    """ "lite0.head.dropout", 0.3 -> {"lite0": {"head": {"dropout": 0.3}}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _stage_params(dvc_yaml):
    """stage name -> the params keys dvc.yaml says it reads."""
    stages = stage_definitions(dvc_yaml)
    return {name: [str(key) for key in stage.get("params", [])] for name, stage in stages.items()}


def _reads(entry, key):
    """Whether a stage reading params `entry` (train, lite0.image_size) reads `key`."""
    return key == entry or key.startswith(f"{entry}.") or entry.startswith(f"{key}.")


def _reruns(search, raw_params, stage_params):
    """The stages a trial reruns, in dvc.yaml's order. A key that switches models, changes the
    val images, or changes nothing the searched model trains on is refused: the first two make
    trials incomparable, the last only spends them."""
    on = {name for name, switched in raw_params["models"].items() if switched is True}
    rerun = set()
    for key in map(_plain_key, search.space):
        stages = [name for name, keys in stage_params.items() if any(_reads(k, key) for k in keys)]
        if key == "models" or key.startswith("models."):
            raise SearchError(f"{search.path}: space {key}: a search cannot switch models")
        if "split" in stages:
            raise SearchError(
                f"{search.path}: space {key}: reruns the split, so trials would be scored on "
                "different val images"
            )
        if not {f"train_{search.model}", f"featurize_{search.model}"} & set(stages):
            raise SearchError(
                f"{search.path}: space {key}: changes nothing {search.model} trains on "
                f"(read by {', '.join(stages) or 'no stage'})"
            )
        rerun |= {stage for stage in stages if stage.partition("_")[2] in on}
    return [stage for stage in stage_params if stage in rerun or stage in ("evaluate", "report")]
