"""dvc.yaml's stages, checked as a stage starts: each model in the study has its stages, and a
stage script's one argument names a model that has that stage."""

from pathlib import Path

import yaml

from transfer_study.core.stage import ParamsError, UserError, shown


def pipeline_stages(dvc_yaml):
    """The stage names of dvc.yaml; None where there is no readable pipeline (a script's own
    params, run outside the project)."""
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text()).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return set(stages) if isinstance(stages, dict) else None


def check_stages(params, dvc_yaml):
    """Every model in the study has its stages in dvc.yaml: otherwise the pipeline would run to
    evaluate and fail there, for want of a model file DVC never asked for."""
    stages = pipeline_stages(dvc_yaml)
    if stages is None:
        return  # nothing to check against
    for name in params.models:
        needed = ["train"] if name == "mlp" else ["featurize", "train"]
        lacking = [f"{kind}_{name}" for kind in needed if f"{kind}_{name}" not in stages]
        if lacking:
            raise ParamsError(
                f"models.{name} is true, but dvc.yaml has no {' or '.join(lacking)} stage: copy "
                "resnet50's stages for it (docs/pipeline.md, Adding a backbone), or set it false"
            )


def stage_model(argv, params, kind, dvc_yaml="dvc.yaml"):
    """The one argument of the `kind` stage script (train, featurize): a model of params.yaml
    (in the study or left out) whose `<kind>_<model>` stage dvc.yaml has. Anything else (no
    argument, two, a typo, a path) is one line: the name becomes file names under the project."""
    stages = pipeline_stages(dvc_yaml)
    valid = [
        name
        for name in params.model_sections
        if (kind != "featurize" or name != "mlp") and (stages is None or f"{kind}_{name}" in stages)
    ]
    usage = f"python stages/{kind}.py MODEL, MODEL one of: {', '.join(valid)}"
    if len(argv) != 1:
        raise UserError(f"expected one model name: {usage}")
    if argv[0] not in valid:
        raise UserError(f"{shown(argv[0])} is not a model with a {kind} stage: {usage}")
    return argv[0]
