"""dvc.yaml lists exactly the package code each stage runs: derived from the imports with `ast`,
so that editing a module reruns every stage that imports it, and no other."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from transfer_study.core.markers import is_skipped

ROOT = Path(REPO)
PACKAGE = ROOT / "src" / "transfer_study"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imported_modules(path):
    """The package's module files that the file at `path` imports, anywhere in it (also inside
    functions: a stage imports its heavy modules only once it knows it needs them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from transfer_study.core import paths` imports a module; `from x.y import z`, x.y.
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            file = ROOT / "src" / f"{name.replace('.', '/')}.py"
            if name.startswith("transfer_study.") and file.is_file():
                found.add(file.relative_to(ROOT).as_posix())
    return found


def package_closure(script):
    """Every package module that running `script` imports, transitively, as dvc.yaml deps."""
    todo, seen = list(_imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imported_modules(ROOT / module)
    return seen


def listed_code(deps):
    """The package modules that dvc.yaml deps name: a folder stands for every module in it."""
    files = set()
    for dep in (d for d in deps if isinstance(d, str) and d.startswith("src/")):
        path = ROOT / dep
        assert path.exists(), f"{dep}: no such file or folder"
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {f.relative_to(ROOT).as_posix() for f in found if f.name != "__init__.py"}
    return files


def test_package_inits_run_nothing():
    """Every import runs its packages' __init__.py, which no stage lists: each must stay a bare
    docstring."""
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body), init


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_exactly_the_code_it_runs(stage):
    spec = STAGES[stage]
    script = re.match(r"python (stages/\w+\.py)", spec["cmd"]).group(1)
    listed, imported = listed_code(spec["deps"]), package_closure(ROOT / script)
    assert script in spec["deps"]
    assert listed == imported, (
        f"{stage}: missing {sorted(imported - listed)}, not imported {sorted(listed - imported)}"
    )


def test_a_per_model_stage_is_a_few_lines():
    lines = (ROOT / "dvc.yaml").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"  \w+:$", line)]
    for first, after in zip(starts, starts[1:] + [len(lines)]):
        body = [line for line in lines[first:after] if line.startswith("    ")]
        if re.match(r"  (train|featurize)_", lines[first]):
            assert len(body) + 1 <= 15, lines[first]


def test_every_stage_says_what_it_is_for_and_every_model_is_an_artifact():
    assert all(spec.get("desc") for spec in STAGES.values())
    trained = {stage.split("_", 1)[1] for stage in STAGES if stage.startswith("train_")}
    artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    assert {name: a["path"] for name, a in artifacts.items()} == {
        m: f"models/{m}.pt" for m in trained
    }
    assert all(a["type"] == "model" for a in artifacts.values())


def test_metrics_lists_only_the_headline_files():
    trained = {stage.split("_", 1)[1] for stage in STAGES if stage.startswith("train_")}
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["metrics"]
    assert set(declared) == {
        "metrics/evaluate.json",
        *(f"dvclive/{m}/metrics.json" for m in trained),
    }


def test_closure_follows_imports_inside_functions():
    # stages/train.py imports the trainer only once it knows the model is in the study.
    assert "src/transfer_study/train/fit.py" in package_closure(ROOT / "stages/train.py")


@pytest.mark.parametrize(
    ("script", "kept_out"),
    [
        ("stages/download.py", {"nn/backbones", "nn/layers", "train/fit", "split"}),
        ("stages/evaluate.py", {"train/fit"}),
        ("stages/report.py", {"nn/backbones", "train/fit"}),
    ],
)
def test_stages_import_only_what_their_job_needs(script, kept_out):
    modules = package_closure(ROOT / script)
    assert not {f"src/transfer_study/{m}.py" for m in kept_out} & modules


@pytest.mark.parametrize(("script", "name"), [("featurize", "resnet50"), ("train", "resnet50")])
def test_a_left_out_models_stage_writes_markers_without_importing_torch(tmp_path, script, name):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # resnet50: false
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['stages/{script}.py', '{name}']\n"
        f"runpy.run_path('{ROOT}/stages/{script}.py', run_name='__main__')\n"
        "print(sorted(m for m in ('torch', 'numpy', 'pytorch_lightning') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "[]"
    outputs = {"featurize": [f"features/{name}/meta.json", f"metrics/featurize_{name}.json"]}
    outputs["train"] = [f"models/{name}.pt", f"metrics/train_{name}.json"]
    for path in outputs[script]:
        assert json.loads((tmp_path / path).read_text()) == {"skipped": True}
    if script == "train":
        assert is_skipped(tmp_path / f"models/{name}.pt")
        # No headline figure: dvc exp show gives a left-out model no column.
        assert json.loads((tmp_path / f"dvclive/{name}/metrics.json").read_text()) == {}
        header = (tmp_path / f"plots/history/{name}.csv").read_text()
        assert header == "epoch,train_loss,train_acc,val_loss,val_acc\n"
