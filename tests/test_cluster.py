"""Two-node DDP as docs/cluster.md runs it: two stage processes, by hand or as srun starts them."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from helpers import (
    REPO,
    TRAIN_KEYS,
    committed_study,
    leftovers,
    run,
    tiny_overrides,
    train_outputs,
    write_params,
)

from transfer_study.core import paths
from transfer_study.core.params_file import deep_merge
from transfer_study.data.splits import load_split

pytestmark = pytest.mark.slow  # two processes a test, as two nodes

# Written as sitecustomize.py into a folder put first on PYTHONPATH: it records what the process
# writes, renames and removes, so that a test can tell which rank wrote the outputs.
WRITES_HOOK = '''"""Logs each path this process writes, renames, creates or removes."""
import os
import sys

if "WRITES_LOG" in os.environ:
    _log = open(os.environ["WRITES_LOG"], "w", buffering=1)
    _CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"}
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _record(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if mode else flags & _WRITE_FLAGS):
                return
        elif event in _CHANGES:
            path = args[1] if event == "os.rename" else args[0]  # a rename: where to
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            _log.write(f"{event} {os.path.abspath(os.fsdecode(path))}\\n")

    sys.addaudithook(_record)
'''

# Two nodes of one process each, on the CPU, training a small MLP for two epochs.
TWO_NODES = {
    "train": {
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 2,
        "strategy": "ddp",
        "max_epochs": 2,
        "patience": 2,
    },
    "mlp": {"hidden": [32]},
}
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK")
LAUNCHER_VARS += ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path_factory):
    """Runs `python stages/train.py mlp` of `code` twice at once in `project`, each process
    with its own environment. Returns ([(exit status, output, paths it wrote in the project)]
    per process, the stage's timing records). Every process still running when the test ends
    is killed with its whole group."""
    logs = tmp_path_factory.mktemp("nodes")  # outside the project, whose files are checked
    (logs / "sitecustomize.py").write_text(WRITES_HOOK)
    # Nothing of a launcher this suite itself may run under (a SLURM job, torchrun) leaks in.
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SLURM_") and key not in LAUNCHER_VARS
    }
    # The two "nodes" share one machine's cores: one thread each, none waiting on the other.
    base["OMP_NUM_THREADS"] = "1"
    timings = logs / "timings.jsonl"  # images each stage passed over, all ranks together
    base["TRANSFER_STUDY_TIMINGS"] = str(timings)
    started = []

    def start(project, *node_envs, code=REPO, seconds=150, stop=None):
        """`stop`: (text, signal), sent to the first process once its output shows text."""
        for rank, env in enumerate(node_envs):
            env = {**base, **env, "WRITES_LOG": str(logs / f"writes{rank}.log")}
            env["PYTHONPATH"] = f"{logs}{os.pathsep}{code}/src"
            with open(logs / f"output{rank}.txt", "w") as output:  # a file: no pipe fills up
                process = subprocess.Popen(
                    [sys.executable, f"{code}/stages/train.py", "mlp"],
                    cwd=project,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a group of its own, killed whole
                )
            started.append(process)
        if stop is not None:
            text, signum = stop
            deadline = time.monotonic() + seconds
            while text not in (logs / "output0.txt").read_text():
                assert started[0].poll() is None, (logs / "output0.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {text!r} in {seconds} s"
                time.sleep(0.05)
            started[0].send_signal(signum)
        results = []
        for rank, process in enumerate(started):
            status = process.wait(timeout=seconds)
            text = (logs / f"output{rank}.txt").read_text()
            writes = (logs / f"writes{rank}.log").read_text().splitlines()
            inside = [w for w in writes if w.split(" ", 1)[1].startswith(f"{project}{os.sep}")]
            results.append((status, text, inside))
        lines = timings.read_text().splitlines() if timings.exists() else []
        return results, [json.loads(line) for line in lines]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def check_one_set_of_outputs(project, results):
    """Both processes succeeded; rank 0 wrote the stage's outputs, each once; rank 1 wrote
    nothing in the project. Returns the stage's metrics."""
    for status, output, _ in results:
        assert status == 0, output[-3000:]
    (_, _, writes0), (_, output1, writes1) = results
    assert writes1 == [], writes1  # not even the checkpoint folder, which rank 0 prepares
    renamed = [line.split(" ", 1)[1] for line in writes0 if line.startswith("os.rename ")]
    for path in (*train_outputs("mlp"), paths.live_summary("mlp")):
        assert (project / path).is_file()
        assert renamed.count(str(project / path)) == 1, path  # written whole, once
    assert leftovers(project) + list(project.rglob("*.tmp")) == []
    assert not (project / paths.checkpoint_dir("mlp")).exists()  # finished: nothing to resume
    metrics = json.loads((project / paths.train_metrics("mlp")).read_text())
    assert TRAIN_KEYS <= metrics.keys() and metrics["epochs"] == 2
    assert metrics["train_images"] == train_count(project)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output1
    return metrics


def train_count(project):
    return len(load_split(project / paths.split_file("train")).labels)


def test_two_nodes_started_by_hand(workdir, archive, two_nodes):
    # Lightning's own multi-node launch: the same command on each node, the node's rank and the
    # address of node 0 in the environment; each node starts train.devices processes itself.
    write_params(workdir / "params.yaml", deep_merge(tiny_overrides(archive), TWO_NODES))
    node = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    results, records = two_nodes(workdir, {**node, "NODE_RANK": "0"}, {**node, "NODE_RANK": "1"})
    check_one_set_of_outputs(workdir, results)
    # Each rank trained on its half of the train split: 2 epochs over all of it, no more.
    assert [record["images"] for record in records] == [2 * train_count(workdir)]


def test_two_nodes_under_slurm_then_dvc_commit(tmp_path, two_nodes):
    # The sbatch script of docs/cluster.md in a DVC project: the stages before training by
    # dvc repro, training as srun starts it, then dvc commit records it.
    project = committed_study(tmp_path / "project")
    run(project, "dvc", "repro", "split")
    settings = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(
        yaml.safe_dump(deep_merge(settings, TWO_NODES), sort_keys=False)
    )
    # What srun sets in each task of `sbatch --nodes=2 --ntasks-per-node=1`; no MASTER_ADDR,
    # NODE_RANK or LOCAL_RANK: Lightning takes the ranks from SLURM_PROCID, SLURM_NODEID and
    # SLURM_LOCALID, the address from the node list. MASTER_PORT is set because the default,
    # derived from the job id, might be taken on a machine that runs other tests.
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train_mlp",  # not "bash" or "interactive", which Lightning ignores
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    task = [{"SLURM_PROCID": r, "SLURM_NODEID": r, "SLURM_LOCALID": "0"} for r in ("0", "1")]
    results, records = two_nodes(project, {**job, **task[0]}, {**job, **task[1]}, code=project)
    check_one_set_of_outputs(project, results)
    # Lightning's SLURM environment, not its default one (which would have made both rank 0).
    for _, output, _ in results:
        assert "SLURM auto-requeueing enabled" in output
    # One timing record, task 0's (SLURM_PROCID 0): 2 epochs over the whole train split, so each
    # rank trained on its half.
    assert [record["images"] for record in records] == [2 * train_count(project)]

    assert "train_mlp" in run(project, "dvc", "status", "train_mlp")  # outside DVC: not recorded
    run(project, "dvc", "commit", "-f", "train_mlp")
    assert "up to date" in run(project, "dvc", "status", "train_mlp")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train_mlp"]
    assert lock["params"]["params.yaml"]["train"]["num_nodes"] == 2  # the params it ran with
    assert {out["path"] for out in lock["outs"]} >= {"models/mlp.pt", "metrics/train_mlp.json"}


@pytest.mark.parametrize("alone", [0, 1])
def test_a_node_without_its_peer_waits_a_bounded_time(workdir, archive, two_nodes, alone):
    # Only one of the two nodes is started: node 0 waits for node 1 to join it, node 1 for node
    # 0 to listen; each gives up after train.rendezvous_timeout.
    bounded = deep_merge(TWO_NODES, {"train": {"rendezvous_timeout": 3}})
    write_params(workdir / "params.yaml", deep_merge(tiny_overrides(archive), bounded))
    port = free_port()
    node = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(alone)}
    [(status, output, writes)], _ = two_nodes(workdir, node, seconds=60)
    whom = "the other 1 of 2 processes to join it" if alone == 0 else "process 0 (node 0)"
    assert status == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        f"error: process {alone} (node {alone} of train.num_nodes = 2) waited 3 s "
        f"(train.rendezvous_timeout) for {whom} at MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: "
        "start every node with that address and port, or raise train.rendezvous_timeout"
    )
    assert writes == [] and not (workdir / paths.checkpoint_dir("mlp")).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_wait_for_a_peer(workdir, archive, two_nodes, signum):
    write_params(workdir / "params.yaml", deep_merge(tiny_overrides(archive), TWO_NODES))
    node = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0"}
    waiting = ("MEMBER: 1/2", signum)  # Lightning's line as the rendezvous starts
    [(status, output, writes)], _ = two_nodes(workdir, node, seconds=60, stop=waiting)
    # Ended by the signal's default action, at once: a shell reports 128 + the signal's number.
    assert status == -signum, output[-3000:]
    assert writes == [] and not (workdir / paths.checkpoint_dir("mlp")).exists()
