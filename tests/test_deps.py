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
from conftest import REPO

from transfer_study.markers import is_skipped

ROOT = Path(REPO)
PACKAGE = ROOT / "src" / "transfer_study"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imported_modules(path):
    """The package's modules that the file at `path` imports, anywhere in it (also inside
    functions: a stage imports its heavy modules only once it knows it needs them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("transfer_study"):
                continue
            relative = f"transfer_study.{node.module or ''}".rstrip(".")
            base = relative if node.level else node.module
            # `from transfer_study import layout` imports a module; `from .x import y`, module x.
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "transfer_study" and len(parts) == 2:
                if (PACKAGE / f"{parts[1]}.py").exists():
                    found.add(parts[1])
    return found


def package_closure(script):
    """Every package module that running `script` imports, transitively, as dvc.yaml deps."""
    todo, seen = list(_imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imported_modules(PACKAGE / f"{module}.py")
    return {f"src/transfer_study/{m}.py" for m in seen}


def test_package_init_runs_nothing():
    """Every import runs __init__.py, which no stage lists: it must stay a bare docstring."""
    body = ast.parse((PACKAGE / "__init__.py").read_text()).body
    assert len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_exactly_the_code_it_runs(stage):
    spec = STAGES[stage]
    script = re.match(r"python (stages/\w+\.py)", spec["cmd"]).group(1)
    listed = {d for d in spec["deps"] if isinstance(d, str) and d.startswith("src/")}
    assert script in spec["deps"]
    assert listed == package_closure(ROOT / script), (
        f"{stage}: missing {sorted(package_closure(ROOT / script) - listed)}, "
        f"not imported {sorted(listed - package_closure(ROOT / script))}"
    )


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
    assert "src/transfer_study/training.py" in package_closure(ROOT / "stages/train.py")


@pytest.mark.parametrize(
    ("script", "kept_out"),
    [
        ("stages/download.py", {"models", "nets", "training", "sources"}),
        ("stages/evaluate.py", {"training"}),
        ("stages/report.py", {"models", "training"}),
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
        header = (tmp_path / f"plots/history/{name}.csv").read_text()
        assert header == "epoch,train_loss,train_acc,val_loss,val_acc\n"
