"""Fixtures of the training tests: launching `training/train.py` on two CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "training" / "train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(
    recipe: str | Path, *arguments: str, expect_success: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Runs `training/train.py --config recipe *arguments` on two CPU processes with `accelerate launch` and returns
    the finished process; asserts it succeeded (showing its output) unless `expect_success=False`."""
    # --multi_gpu is Accelerate's torchrun launcher; without GPUs the processes join a gloo group on the CPU
    # (`--cpu --num_processes 2` would start a single process).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(TRAIN_SCRIPT), "--config", str(recipe), *arguments,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_success:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(name="launch_two_processes", scope="session")
def launch_two_processes_fixture():
    """The function `launch_two_processes(recipe, *arguments, expect_success=True, timeout=600)` (see it)."""
    return launch_two_processes
