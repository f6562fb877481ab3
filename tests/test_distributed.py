"""Two CPU processes (accelerate launch, gloo) match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_exact

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"
EVAL_SCRIPT = Path(__file__).parent / "scripts" / "evaluate_once.py"


FSDP2 = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
]  # fmt: skip


def launch(num_processes: int, per_device_batch: int, out: Path, mode: str, extra=(), script: Path = SCRIPT) -> dict:
    # `--cpu` would pick accelerate's single-process launcher (multi-CPU needs MPI); `--multi_gpu` goes through
    # torchrun, and with no visible GPU accelerate sets up a gloo process group on CPU.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    launcher = list(extra) or (["--multi_gpu"] if num_processes > 1 else [])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(script), str(out), str(per_device_batch), mode,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("normalization", "strategy"), [("weights", "ddp"), ("nonzero_tokens", "ddp"), ("weights", "fsdp2")]
)
def test_two_processes_match_one(tmp_path, normalization, strategy):
    """Same global batch of 4: one process x 4 examples vs two processes x 2 (DDP, or FSDP2 with a sharded head)."""
    single = launch(1, 4, tmp_path / "single.pt", normalization)
    double = launch(2, 2, tmp_path / "double.pt", normalization, FSDP2 if strategy == "fsdp2" else ())
    assert single.pop("world_size") == 1 and double.pop("world_size") == 2  # really distributed
    for name in single:
        assert_exact(double[name], single[name], msg=name)  # float64: only summation order differs


@pytest.mark.distributed
@pytest.mark.parametrize(("layout", "per_device_batch"), [("padded", 1), ("padding_free", 2)])
def test_eval_metrics_on_two_processes_drop_the_repeated_samples(tmp_path, layout, per_device_batch):
    """3 eval examples on 2 processes: accelerate repeats the first one to even out the last batch; the split
    metrics must equal one process's over the 3 examples (samples are rows, or documents when padding-free)."""
    single = launch(1, 3, tmp_path / "single.pt", layout, script=EVAL_SCRIPT)
    double = launch(2, per_device_batch, tmp_path / "double.pt", layout, script=EVAL_SCRIPT)
    assert single.pop("world_size") == 1 and double.pop("world_size") == 2
    names = ("loss", "prompt_loss", "completion_loss", "sequence_loss", "completion_accuracy")
    for name in names:
        key = f"eval_{name}"
        assert double[key] == pytest.approx(single[key], rel=1e-12, abs=1e-12), key
