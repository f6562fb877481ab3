"""Evaluate a tiny PLWTrainer model on a 3-example set; run under `accelerate launch` by test_distributed.py.

Three examples never split evenly over two processes, so accelerate repeats one to even out the last batch: the
split metrics must drop it exactly as Trainer's own gathering does. Writes the metrics (rank 0) to the path given.
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


def main(out_path: str, per_device_batch: int, layout: str) -> None:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=2).double()  # exact on any CPU
    data = prompt_completion_dataset(conversational=True, n=8)
    trainer = PLWTrainer(
        model,
        args=PLWConfig(
            **common_args(output_dir=out_path + ".d", per_device_eval_batch_size=per_device_batch),
            prompt_loss_weight=0.1,
            padding_free=layout == "padding_free",
            # TRL enforces max_length only by truncating while packing; these rows are short anyway.
            **({"max_length": None} if layout == "padding_free" else {}),
        ),
        train_dataset=data,
        eval_dataset=data.select(range(3)),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        torch.save({**metrics, "world_size": trainer.accelerator.num_processes}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
