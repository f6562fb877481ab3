"""One SGD step of PLWTrainer on a fixed 4-example dataset; run under `accelerate launch` by test_distributed.py.

Writes the updated parameters (rank 0) to the path given as the first argument, so the test can compare a
2-process run (2 examples per process) with a 1-process run (4 examples) of the same global batch.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402
from test_trainer import common_args, prompt_completion_dataset  # noqa: E402

from trl_plw import PLWConfig, PLWTrainer  # noqa: E402
from trl_plw.experiments.offline_model import load_tokenizer  # noqa: E402


def main(out_path: str, per_device_batch: int, normalization: str) -> None:
    tokenizer = load_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=2).double()  # exact on any CPU
    trainer = PLWTrainer(
        model,
        args=PLWConfig(
            **common_args(output_dir=out_path + ".d", per_device_train_batch_size=per_device_batch),
            prompt_loss_weight=0.1,
            loss_normalization=normalization,
        ),
        train_dataset=prompt_completion_dataset(conversational=True, n=4),
        processing_class=tokenizer,
    )
    trainer.train()
    # Under FSDP2 parameters are sharded DTensors: gather them on every rank (a collective), save on rank 0.
    state = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for n, p in trainer.model.named_parameters()
    }
    if trainer.accelerator.is_main_process:
        torch.save({**state, "world_size": trainer.accelerator.num_processes}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
