"""scripts/gpu_check.py: its message without CUDA, and its loops on the CPU (dry run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_without_cuda_it_says_why_and_exits_3():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "no CUDA device is available" in done.stderr
    assert "nothing was timed" in done.stderr
    assert done.stdout == ""


def test_cpu_dry_run_times_every_precision_and_agrees_with_itself(capsys):
    module = load_script()
    code = module.main(
        ["--cpu-dry-run", "--steps", "1", "--warmup", "0", "--agree-steps", "1", "--datasets", "ColoredMNIST"]
        + ["--batch-size", "4", "--algorithms", "ERM", "PCGrad"]
    )
    assert code == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| Colored")]
    seen = {(cells[1].strip(), cells[2].strip()) for cells in rows}
    # ERM trains under fp16 (loss scaling), PCGrad does not declare it
    assert seen == {("ERM", "off"), ("ERM", "bf16"), ("ERM", "fp16"), ("PCGrad", "off"), ("PCGrad", "bf16")}
    erm_off = next(cells for cells in rows if cells[1].strip() == "ERM" and cells[2].strip() == "off")
    assert float(erm_off[4]) == 1.0  # ERM's ratio to itself
    # CPU against CPU: the same weights and batches give the same parameters
    assert float(erm_off[6]) == 0.0
