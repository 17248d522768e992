"""`grpo-image launch`: the trainer's GPUs and the reward workers' GPUs apart, as the recipe's hardware: says.

Rehearsed on the CPU with a node of 8 fake GPUs: CUDA_VISIBLE_DEVICES names them, and Ray, started on some of them
with --num-gpus, hands them out to the reward workers as it would real ones. The rehearsal runs the launcher in a
subprocess with a Ray head of its own (its own port and temp dir): the test session's Ray is not touched.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_image.app.cli import main
from grpo_image.base.config import RecipeError, load_recipe
from grpo_image.training.launch import plan_placement, reward_gpus, visible_gpus
from grpo_image.training.preflight import check_reward_placement
from tests.test_cli_train import RECIPE, SMALL

REPO = Path(__file__).resolve().parents[1]
NODE_OF_8 = [str(index) for index in range(8)]
GPU_WORKERS = ["workers.backend=ray", "workers.num_gpus=1", "workers.num_cpus=0"]


def recipe(name: str, *overrides: str):
    return load_recipe(REPO / "recipes" / f"{name}.yaml", list(overrides))


def test_visible_gpus_are_cuda_visible_devices_as_named():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5,GPU-8f2c"}) == ["3", "5", "GPU-8f2c"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("name, overrides, training, rewards, idle", [
    # 1 process x 4 workers x 1 GPU: GPU 0 trains, 1-4 score, 5-7 idle
    ("xomni_en_lora", [], ["0"], ["1", "2", "3", "4"], ["5", "6", "7"]),
    # 1 process x 2 workers x 0.5 GPU: both workers share GPU 1
    ("janus_pro_7b", [], ["0"], ["1"], ["2", "3", "4", "5", "6", "7"]),
    # 4 processes x 1 worker x 1 GPU: 4 + 4
    ("xomni_en_full", ["hardware.gpus=4"], ["0", "1", "2", "3"], ["4", "5", "6", "7"], []),
    # 2 processes x 4 workers x 0.3 GPU = 8 workers, three to a GPU (0.9): 3 GPUs
    ("xomni_en_lora", ["hardware.gpus=2", "workers.num_gpus=0.3"], ["0", "1"], ["2", "3", "4"], ["5", "6", "7"]),
    # in-process rewards: every listed GPU but the training ones idle
    ("xomni_en_lora", ["workers.backend=inprocess"], ["0"], [], ["1", "2", "3", "4", "5", "6", "7"]),
])
def test_the_first_gpus_train_and_the_next_hold_the_reward_workers(name, overrides, training, rewards, idle):
    placement = plan_placement(recipe(name, *overrides), NODE_OF_8)
    assert (placement.training, placement.rewards, placement.idle) == (training, rewards, idle)


def test_gpu_counts_of_fractional_workers():
    assert reward_gpus(recipe("xomni_en_lora", "workers.num_gpus=0.3333333333333333")) == (4, 2)  # 3 + 1 a GPU
    assert reward_gpus(recipe("xomni_en_lora", "workers.num_gpus=0.25")) == (4, 1)
    with pytest.raises(RecipeError, match=r"'workers.num_gpus' above 1 must be a whole number"):
        reward_gpus(recipe("xomni_en_lora", "workers.num_gpus=1.5"))


@pytest.mark.parametrize("name, overrides, message", [
    ("xomni_en_full", [], r"^the recipe needs 16 GPUs on this node, 8 training \(hardware.gpus\) and 8 for its 8 reward "
                          r"workers \(8 processes x workers.num_workers 1 x workers.num_gpus 1\), but 8 are visible"),
    ("xomni_en_lora", ["hardware.gpus=0"], r"^'hardware.gpus' is 0"),
    ("xomni_en_lora", ["workers.ray_address=auto"], r"^'workers.ray_address' is set \(auto\): launch starts a Ray of its own"),
])
def test_launch_refuses_in_one_line_before_anything_starts(monkeypatch, capsys, name, overrides, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(NODE_OF_8))
    assert main(["launch", f"recipes/{name}.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err.removeprefix("grpo-image: error: ")), err


def test_gpu_workers_without_a_cluster_are_refused_with_the_command_that_works(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["train", RECIPE, *SMALL, *GPU_WORKERS, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("grpo-image: error: 'workers.num_gpus' is 1 but no Ray cluster is named") and \
        "run `grpo-image launch RECIPE [key=value ...]`" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


def test_sharing_the_training_gpu_is_an_explicit_choice_of_one_process(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shared = load_recipe(RECIPE, [*GPU_WORKERS, "workers.share_training_gpus=true"])
    check_reward_placement(shared, processes=1)  # one GPU, shared on purpose
    with pytest.raises(RecipeError, match=r"workers.share_training_gpus covers one training process only"):
        check_reward_placement(shared, processes=2)
    check_reward_placement(load_recipe(RECIPE, [*GPU_WORKERS, "workers.ray_address=auto"]), processes=8)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_reward_placement(load_recipe(RECIPE, GPU_WORKERS), processes=8)
    assert main(["validate", RECIPE, *SMALL, *GPU_WORKERS]) == 0  # a recipe that launch may place


def read_records(folder: Path, prefix: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob(f"{prefix}_*.json"))]


def rehearsal(tmp_path: Path, *overrides: str) -> tuple[list[str], dict]:
    """The launch command of a node of 8 fake GPUs (the command, its environment): the demo recipe at test size on 2
    training processes, 2 reward workers of one GPU each per process, every part recording where it runs."""
    records = tmp_path / "records"
    records.mkdir()
    policy = (f"policy={{_component_: tests.helpers_placement.recording_tiny_policy, record_dir: '{records}', "
              "num_codes: 16, grid: [2, 2], hidden_size: 32, num_layers: 1, seed: 0}")
    rewards = (f"rewards=[{{name: red, scorer: {{_component_: tests.helpers_placement.RecordsWorkerGpus, "
               f"record_dir: '{records}'}}}}]")
    command = [sys.executable, "-m", "grpo_image", "launch", RECIPE, *SMALL, "sample_every=0", "logging.tensorboard=false",
               "hardware.gpus=2", "workers.num_workers=2", *GPU_WORKERS, policy, rewards, f"output_dir={tmp_path / 'run'}",
               *overrides]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(NODE_OF_8)
    return command, env


def processes_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (a launch's temp dir, a run's output folder)."""
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if text in " ".join(p.info["cmdline"] or [])]


def head_temp_dir(stderr: str) -> str:
    return re.search(r"\(log: (/\S+)/head\.log\)", stderr).group(1)


def test_a_launch_on_a_node_of_8_keeps_training_and_reward_gpus_apart(tmp_path):
    """2 training processes (gloo) and 2 x 2 reward workers of one GPU each on a node of 8 fake GPUs: the ranks train
    on GPUs 0 and 1, the workers get 2, 3, 4 and 5 from Ray, one each; 6 and 7 stay idle."""
    command, env = rehearsal(tmp_path, "steps=2")
    records = tmp_path / "records"
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("grpo-image launch: training on GPUs 0,1 (2 processes, hardware.gpus); 4 reward workers on GPUs 2,3,4,5 "
            "(2 processes x workers.num_workers 2 x workers.num_gpus 1); idle: 6,7") in result.stderr

    ranks = {record["rank"]: record["gpu"] for record in read_records(records, "rank")}
    workers = read_records(records, "worker")
    assert ranks == {0: "0", 1: "1"}
    assert len(workers) == 4 and all(len(w["gpu_ids"]) == 1 and w["visible"] == w["gpu_ids"][0] for w in workers)
    worker_gpus = {w["gpu_ids"][0] for w in workers}
    assert worker_gpus == {"2", "3", "4", "5"}  # one GPU each, none shared, none of the training ones
    assert worker_gpus.isdisjoint(ranks.values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2

    temp_dir = head_temp_dir(result.stderr)
    assert not Path(temp_dir).exists()
    assert processes_naming(temp_dir) == [], "processes of the launch's Ray head still running"


def test_ctrl_c_stops_the_training_processes_and_the_ray_head(tmp_path):
    """SIGINT to the launcher alone, once its head is up and both ranks are building their policies: exit code 130,
    and no process of the head or of the training is left."""
    command, env = rehearsal(tmp_path, "steps=50")
    launcher = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((tmp_path / "records").glob("rank_*.json"))) < 2 and launcher.poll() is None:
            assert time.monotonic() < deadline, "the training processes did not start"
            time.sleep(0.5)
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stderr[-4000:]
    assert "grpo-image launch: interrupted; the training processes and the Ray head were stopped" in stderr
    assert processes_naming(head_temp_dir(stderr)) == [], "processes of the launch's Ray head still running"
    assert processes_naming(str(tmp_path / "run")) == [], "training processes still running"
