"""``trl-plw sweep``: which prompt-loss weight for *my* data? The article's sweep for any dataset.

For each prompt-loss weight (and seed), fine-tune on the user's dataset and evaluate on a schedule: prompt loss,
completion loss, full-sequence loss and (with ``--answer_tokens``) answer accuracy, all from the fused pass. The
outputs are the article's three findings, each with its uncertainty:

1. the stopping-rule table: accuracy at the minimum of the validation full-sequence loss vs at the minimum of the
   completion loss, per weight (the article: prompt loss dominates the full-sequence loss, so stopping on it is
   worse);
2. steps to the minimum of the completion loss, per weight (the article: small weights get there sooner);
3. the best accuracy, per weight (the article: small weights reach a higher best accuracy).

Accuracies come with Wilson 95% intervals over the evaluation items (pooled over seeds), so a difference can be read
against the noise of a finite evaluation set. The command also measures the generation ratio Rg of the training data
and recommends a weight, with the evidence for it (the article's closing advice, turned into a measurement).

``--sweep_weight <rule>`` sweeps a span rule's weight instead (the prompt weight then stays fixed): the same runs,
table and findings, labelled ``<rule> weight``; its recommendation is the best measured weight (the article's prior
and the generation ratio concern the prompt weight only).

Outputs in ``--output_dir``: ``config.json``; per run ``[seed_S/]plw_W/metrics.jsonl`` and ``done.json``;
``metrics.csv`` (long format), ``summary.json``/``summary.md`` and a plot. A killed sweep is resumable: rerunning the
same command skips every run that has its ``done.json`` and continues with the weights not yet done.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARTICLE_SWEEP = (1.0, 0.5, 0.2, 0.1, 0.01, 0.0)
logger = logging.getLogger(__name__)
Z_95 = 1.959963984540054


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field with TRL's ``metadata={"help": ...}`` (what the command's ``--help`` prints)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SweepArguments:
    """What only a sweep has: the weights and seeds to sweep, the data, the adapters, the evaluation holdout.

    Every training setting is a `PLWConfig` field under its own name (``--per_device_train_batch_size``,
    ``--learning_rate``, ...): ``trl-plw sweep`` parses this class together with PLWConfig, like ``trl-plw sft``.
    A new axis of the sweep is a field here and a loop in `run_sweep` (see ``plws``/``seeds``).
    """

    model_name_or_path: str = help_field("Model to fine-tune: a Hub id, a local folder, or the offline 'smollm2-135m'.",
                                    default="smollm2-135m")  # fmt: skip
    dataset_name: str = help_field("Dataset: a Hub id or a local json/jsonl/parquet/csv file.", default="")
    dataset_config: str | None = help_field("The dataset's configuration name, if it has several.", default=None)
    dataset_train_split: str = help_field("Split to train on.", default="train")
    dataset_test_split: str | None = help_field(
        "Split to evaluate on. None: hold rows of the training split out (see eval_examples); a single local file "
        "has one split.",
        default=None,
    )
    prompt_column: str = help_field("Prompt column (prompt-completion data).", default="prompt")
    completion_column: str = help_field("Completion column (prompt-completion data).", default="completion")
    messages_column: str | None = help_field("Conversation column (chat data), if not 'messages'.", default=None)
    text_column: str | None = help_field("Plain-text column; needs response_template.", default=None)
    train_examples: int | None = help_field("Train on at most this many rows (None: all).", default=None)
    eval_examples: int | None = help_field(
        "Evaluation rows. With dataset_test_split, at most this many of it; without, this many are held out of "
        "the training split. None: min(200, a fifth of the rows), stated in the log.",
        default=None,
    )
    lora_r: int = help_field("LoRA rank on all linear layers; 0 = full fine-tuning.", default=16)
    lora_alpha: int = help_field("LoRA alpha.", default=16)
    lora_dropout: float = help_field("LoRA dropout.", default=0.05)
    # Without gradient checkpointing (with it, TRL makes the input embeddings require grad), backpropagation stops
    # at the lowest adapted layer, so a step costs less (measured on 2 CPU cores: -23% with the top 15 of SmolLM2's
    # 30 layers).
    lora_last_layers: int | None = help_field(
        "LoRA on the last N decoder layers only (None: every layer); backward then stops below them.", default=None
    )
    attn_implementation: str | None = help_field(
        "None/'auto': trl_plw.attention.select_attn_implementation (sdpa on CPU, a varlen kernel for packed GPU "
        "rows); or a name ('eager', 'sdpa', ...), validated against the device.",
        default=None,
    )
    # Lists for the parser (HfArgumentParser reads list fields as nargs="+"); a SweepConfig holds them as tuples.
    seeds: list[int] = help_field("Seeds; each weight is trained once per seed.", default_factory=lambda: [0])
    plws: list[float] = help_field(
        "Weights to sweep (alias: --plw): prompt loss weights, or the weights of the span rule --sweep_weight names.",
        default_factory=lambda: list(ARTICLE_SWEEP),
    )
    sweep_weight: str = help_field(
        "Which weight --plws sets: 'prompt' (prompt_loss_weight), or the name of a span rule (a preset rule such as "
        "'think' or 'tool_call', or a named rule of --span_weights): each run then sets that rule's weight, and "
        "--prompt_loss_weight (if given) stays fixed. See docs/WEIGHTS.md.",
        default="prompt",
    )
    # Before the first step every weight has the same model (LoRA's B starts at zero), so its step-0 metrics are
    # the same; only `eval_loss`, the weighted mean, depends on the weight, and it is left out of the copies.
    share_initial_eval: bool = help_field(
        "Evaluate the untrained model once per seed instead of once per run ((weights - 1) evaluations saved).",
        default=True,
    )


RUN_FIELDS = ("output_dir", "prompt_loss_weight", "seed", "data_seed", "eval_on_start")
"""PLWConfig fields each run sets itself: ``extra`` may not hold them (the weight and seed are the sweep's axes)."""


@dataclass
class SweepConfig(SweepArguments):
    """One sweep: `SweepArguments` plus the training settings of every run, as `PLWConfig` fields of the same name
    (the sweep's defaults below; `build_config` passes them on by name). ``extra``: any other PLWConfig keyword."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    eval_steps: int = 20
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 0.05  # < 1: a fraction of the steps
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    max_length: int = 1024
    # Padded on CPU: without a varlen kernel, sdpa computes a packed row's full T^2 attention under a block mask,
    # which costs more than the padding it saves (measured: an eval pass 6x slower packed). GPUs pack.
    packing: bool = False
    # None: bf16 only where it is native (accelerators with bf16, CPUs with AVX512-BF16/AMX/Arm BF16), else fp32;
    # emulated bf16 is ~3x slower than fp32 on CPU (trl_plw.precision).
    bf16: bool | None = None
    activation_checkpointing: bool = False
    loss_normalization: str = "weights"
    # Single-token answers (e.g. A B C D): enables per-example answer accuracy and its confidence intervals.
    answer_tokens: tuple[str, ...] | None = None
    # Plain-text data: where the completion starts (and, for multi-turn text, where a prompt starts).
    response_template: str | None = None
    instruction_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seeds, self.plws = tuple(self.seeds), tuple(self.plws)
        if self.answer_tokens is not None:
            self.answer_tokens = tuple(self.answer_tokens)
        run_fields = set(RUN_FIELDS) - ({"prompt_loss_weight"} if self.sweeps_span else set())
        clash = sorted(set(self.extra) & run_fields)
        if self.sweeps_span:
            from trl_plw.spans import with_rule_weight

            with_rule_weight(self.extra.get("span_weights"), self.sweep_weight, 1.0)  # an unknown rule raises now
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set for a sweep: each run sets it (the weights are --plws, the seeds "
                "--seeds, and each run's folder is under --output_dir)."
            )
        if self.lora_last_layers is not None and self.lora_r <= 0:
            raise ValueError(
                f"lora_last_layers={self.lora_last_layers} places LoRA adapters, but lora_r={self.lora_r} means full "
                "fine-tuning, which trains every layer; set lora_r > 0 or leave lora_last_layers unset"
            )

    @property
    def sweeps_span(self) -> bool:
        """Whether the swept values are a span rule's weight (``sweep_weight`` names one) rather than the prompt's."""
        return self.sweep_weight != "prompt"

    @property
    def axis_name(self) -> str:
        """What a swept value is, in folder names and labels: ``plw``, or the span rule's name."""
        return self.sweep_weight if self.sweeps_span else "plw"


TRAINING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(SweepConfig) if f.name not in SweepArguments.__dataclass_fields__ and f.name != "extra"
)
"""The `PLWConfig` fields a sweep sets for every run, under their PLWConfig names."""


# ---------------------------------------------------------------------------------------------------------- data
def load_sweep_splits(config: SweepConfig, seed: int = 0):
    """Train and evaluation sets of a user's dataset, as the trainer takes them.

    RACE-schema tables (article, question, options, answer) are formatted with the RACE template; prompt-completion,
    ``messages`` and text columns pass through unchanged (PLWTrainer applies chat and response templates). Without
    a ``dataset_test_split``, `holdout_size` rows are held out of the training split, drawn with ``seed``.
    """
    from trl_plw.experiments.data.race import format_race_example, load_raw_dataset

    raw = load_raw_dataset(config.dataset_name, config.dataset_config, config.dataset_train_split)
    raw_eval = (
        load_raw_dataset(config.dataset_name, config.dataset_config, config.dataset_test_split)
        if config.dataset_test_split
        else None
    )

    def prepare(table):
        columns = table.column_names
        if config.text_column is not None:
            return table.select_columns([config.text_column]).rename_columns(
                {config.text_column: "text"} if config.text_column != "text" else {}
            )
        if config.messages_column is not None:
            return table.select_columns([config.messages_column]).rename_columns(
                {config.messages_column: "messages"} if config.messages_column != "messages" else {}
            )
        if config.prompt_column in columns and config.completion_column in columns:
            renames = {
                k: v for k, v in ((config.prompt_column, "prompt"), (config.completion_column, "completion")) if k != v
            }
            return table.select_columns([config.prompt_column, config.completion_column]).rename_columns(renames)
        if "messages" in columns:
            return table.select_columns(["messages"])
        if all(c in columns for c in ("article", "question", "options", "answer")):
            return table.map(format_race_example, remove_columns=columns, desc="Formatting RACE")
        if "text" in columns:
            return table.select_columns(["text"])
        raise ValueError(
            f"{config.dataset_name}: found columns {columns}; expected prompt/completion (--prompt_column, "
            "--completion_column), messages (--messages_column), text (--text_column with --response_template) "
            "or the RACE schema"
        )

    train = prepare(raw).shuffle(seed=seed)
    if raw_eval is not None:
        evaluation = prepare(raw_eval)
        if config.eval_examples is not None and config.eval_examples < len(evaluation):
            evaluation = evaluation.shuffle(seed=seed).select(range(config.eval_examples))
    else:
        n_eval = holdout_size(len(train), config.eval_examples, config.dataset_name)
        evaluation, train = train.select(range(n_eval)), train.select(range(n_eval, len(train)))
    if config.train_examples is not None and config.train_examples < len(train):
        train = train.select(range(config.train_examples))
    return train, evaluation


AUTO_HOLDOUT_MAX, AUTO_HOLDOUT_FRACTION = 200, 5


def holdout_size(n_rows: int, eval_examples: int | None, dataset: str) -> int:
    """Rows to hold out of an ``n_rows`` training split for evaluation.

    ``eval_examples=None`` picks min(200, a fifth of the rows) and says so in the log: enough items for the
    accuracy intervals on a large set, and a small file still keeps four fifths to train on. An explicit number
    that leaves nothing to train on is refused, naming the two ways out.
    """
    if eval_examples is None:
        n_eval = min(AUTO_HOLDOUT_MAX, n_rows // AUTO_HOLDOUT_FRACTION)
        if n_eval < 1:
            raise ValueError(
                f"{dataset}: {n_rows} rows are too few to hold any out for evaluation; pass a separate split with "
                "--dataset_test_split, or more data."
            )
        logger.warning(
            "%s: holding out %d of %d training rows for evaluation (min(%d, 1/%d of the rows); set --eval_examples "
            "or --dataset_test_split to choose).",
            dataset, n_eval, n_rows, AUTO_HOLDOUT_MAX, AUTO_HOLDOUT_FRACTION,
        )  # fmt: skip
        return n_eval
    if not 1 <= eval_examples < n_rows:
        raise ValueError(
            f"{dataset}: {n_rows} rows cannot hold out eval_examples={eval_examples} for evaluation and still train; "
            f"pass a smaller --eval_examples (below {n_rows}; leave it unset for min({AUTO_HOLDOUT_MAX}, 1/"
            f"{AUTO_HOLDOUT_FRACTION} of the rows)) or evaluate on another split with --dataset_test_split."
        )
    return eval_examples


# ---------------------------------------------------------------------------------------------------------- runs
def resolve_bf16(config: SweepConfig) -> bool:
    """The config's bf16 choice, or the hardware's native default (`trl_plw.precision.default_bf16`)."""
    import torch

    from trl_plw.precision import default_bf16

    return default_bf16(use_cpu=not torch.cuda.is_available()) if config.bf16 is None else config.bf16


def build_config(config: SweepConfig, plw: float, output_dir: Path, seed: int = 0, *, eval_on_start: bool = True):
    """The `PLWConfig` of one run: the sweep's training fields by name, then one weight and one seed, evaluated on
    a step schedule (from step 0 by default). ``config.extra`` may change the schedule, logging or reporting."""
    import torch

    from trl_plw._compat import checkpointing_kwargs
    from trl_plw.trainer import PLWConfig

    kwargs: dict[str, Any] = {name: getattr(config, name) for name in TRAINING_FIELDS}
    kwargs.update(
        bf16=resolve_bf16(config),
        answer_tokens=list(config.answer_tokens) if config.answer_tokens else None,
        eval_strategy="steps",
        logging_steps=max(1, config.eval_steps // 2),
        save_strategy="no",
        report_to="none",
        # activation_checkpointing in transformers >= 5.23, gradient_checkpointing before
        **checkpointing_kwargs(kwargs.pop("activation_checkpointing")),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    kwargs.update(config.extra)
    kwargs.update(output_dir=str(output_dir), seed=seed, data_seed=seed, eval_on_start=eval_on_start)
    if config.sweeps_span:
        from trl_plw.spans import with_rule_weight

        kwargs["span_weights"] = with_rule_weight(kwargs.get("span_weights"), config.sweep_weight, plw)
    else:
        kwargs["prompt_loss_weight"] = plw
    return PLWConfig(**kwargs)


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return _text_length(value.get("content", ""))
    if isinstance(value, list | tuple):
        return sum(_text_length(v) for v in value)
    return 0


def sort_by_length(dataset: Any) -> Any:
    """``dataset`` ordered by text length, so that each padded evaluation batch holds rows of similar length.

    The evaluation metrics are token sums over the whole set (`trl_plw.metrics`), so the order changes nothing but
    the padding: ~15% of an evaluation's tokens on the CPU RACE preset (batches of 50), ~5% sorted.
    """
    columns = [c for c in ("prompt", "completion", "messages", "text") if c in dataset.column_names]
    lengths = [sum(_text_length(row[c]) for c in columns) for row in dataset]
    return dataset.select(sorted(range(len(lengths)), key=lengths.__getitem__))


def _lora_config(config: SweepConfig, model: Any | None = None):
    """LoRA on every linear layer, or, with ``config.lora_last_layers``, on those of the model's last N layers."""
    from peft import LoraConfig

    if config.lora_last_layers is None:
        targets, layers = "all-linear", None
    else:
        if model is None:
            raise ValueError(f"lora_last_layers={config.lora_last_layers} needs the loaded model to place adapters")
        num_layers = num_decoder_layers(model)
        adapted = adapted_layer_count(config.lora_last_layers, num_layers)
        layers = list(range(num_layers - adapted, num_layers))
        # PEFT takes a layer subset only with named targets: the names "all-linear" stands for.
        targets = linear_module_names(model)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def adapted_layer_count(lora_last_layers: int | None, num_layers: int) -> int:
    """How many decoder layers carry adapters; refuses a count the model cannot have (training and the dry run's
    memory estimate share this check, so neither silently adapts another number of layers than asked)."""
    if lora_last_layers is None:
        return num_layers
    if not 1 <= lora_last_layers <= num_layers:
        raise ValueError(
            f"lora_last_layers={lora_last_layers} must be between 1 and the model's {num_layers} decoder "
            "layers; leave it unset (None) to adapt every layer"
        )
    return lora_last_layers


def num_decoder_layers(model: Any) -> int:
    """Decoder layers of a loaded model (the text model's, for multimodal wrappers)."""
    return int(model.config.get_text_config().num_hidden_layers)


def linear_module_names(model: Any) -> list[str]:
    """Names of the model's linear layers apart from the output head: what PEFT's ``"all-linear"`` adapts."""
    import torch

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        }
    )


def run_one(
    config: SweepConfig,
    plw: float,
    output_dir: Path,
    datasets,
    seed: int = 0,
    initial_eval: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate one (weight, seed); returns the logged events, also written to ``metrics.jsonl``.

    ``initial_eval``: the step-0 evaluation of another weight's run with the same seed and data (see
    `SweepConfig.share_initial_eval`); recorded as this run's step 0 (marked ``initial_eval_shared_from``, without
    ``eval_loss``) instead of evaluating again. ``done.json`` is written last, so a run killed half-way has none and
    is rerun from scratch on resume.
    """
    import random

    import numpy as np
    import torch
    from transformers import TrainerCallback

    from trl_plw.attention import select_attn_implementation
    from trl_plw.experiments.offline_model import load_model, load_tokenizer
    from trl_plw.trainer import PLWTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "done.json").unlink(missing_ok=True)
    train, evaluation = datasets
    events: list[dict[str, Any]] = []
    log_path = output_dir / "metrics.jsonl"
    log_path.write_text("")

    def record(event: dict[str, Any]) -> None:
        events.append(event)
        with log_path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            record({"plw": plw, "seed": seed, "step": state.global_step, **(logs or {})})

    class TrainingRngIndependentOfInitialEval(TrainerCallback):
        """Training starts from the RNG state it had before the step-0 evaluation, evaluated or shared.

        Every DataLoader iterator draws a seed from the global RNG, so an evaluation before the first step shifts
        the stream that LoRA dropout then uses. Without this, a run whose step 0 is shared trains differently from
        the same run evaluated at step 0; on the CPU RACE regime that alone decided whether PLW 0.1 learned the
        task by step 60 (docs/results/race-cpu-long/2026-12-01-60-steps-dropout).
        """

        def __init__(self) -> None:
            self.saved: tuple[Any, ...] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            self.saved = (torch.get_rng_state(), cuda, random.getstate(), np.random.get_state())

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.saved is None:
                return
            cpu, cuda, python, numpy_state = self.saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            random.setstate(python)
            np.random.set_state(numpy_state)
            self.saved = None

    if initial_eval is not None:
        shared = {k: v for k, v in initial_eval.items() if k not in ("eval_loss", "plw", "seed")}
        record({"plw": plw, "seed": seed, **shared, "initial_eval_shared_from": initial_eval["plw"]})
    bf16 = resolve_bf16(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = select_attn_implementation(device, packed=config.packing, requested=config.attn_implementation)
    model = load_model(
        config.model_name_or_path, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=attn
    )
    trainer = PLWTrainer(
        model,
        args=build_config(config, plw, output_dir, seed, eval_on_start=initial_eval is None),
        train_dataset=train,
        eval_dataset=sort_by_length(evaluation),
        processing_class=load_tokenizer(config.model_name_or_path),
        peft_config=_lora_config(config, model) if config.lora_r > 0 else None,
        callbacks=[Recorder(), TrainingRngIndependentOfInitialEval()],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    record(
        {
            "plw": plw,
            "seed": seed,
            "step": trainer.state.global_step,
            "wall_seconds": wall,
            "bf16": bf16,
            "attn_implementation": model.config._attn_implementation,
        }
    )
    (output_dir / "done.json").write_text(json.dumps({"plw": plw, "seed": seed, "wall_seconds": wall}) + "\n")
    return events


def run_dir(output_dir: Path, plw: float, seed: int, seeds: Sequence[int], axis: str = "plw") -> Path:
    """``plw_W`` for a one-seed sweep (the layout of earlier recordings), ``seed_S/plw_W`` otherwise; a span-weight
    sweep names the folders after the rule (``think_W``)."""
    name = f"{axis}_{plw:g}"
    return output_dir / name if len(seeds) == 1 else output_dir / f"seed_{seed}" / name


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(
    config: SweepConfig,
    output_dir: Path,
    *,
    load_splits: Callable[[SweepConfig, int], tuple[Any, Any]] = load_sweep_splits,
    plots: bool = True,
    plot_name: str = "sweep.png",
    resume: bool = True,
) -> dict[str, Any]:
    """Every (seed, weight) run, then the summary, stopping-rule table, recommendation and plot.

    With ``resume`` (default), runs that finished (``done.json``) are read back instead of retrained.
    """
    from tqdm.auto import tqdm

    if resume:
        check_resumable(config, output_dir)
    # The data loads before config.json is written: a start that fails on its data (a missing file, a holdout
    # that does not fit) leaves nothing that would bind the corrected rerun to its settings.
    datasets: dict[int, tuple[Any, Any]] = {config.seeds[0]: load_splits(config, config.seeds[0])}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    jobs = [(seed, plw) for seed in config.seeds for plw in config.plws]
    all_events: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc=f"{config.axis_name} sweep", unit="run")
    for seed, plw in bar:
        bar.set_postfix({config.axis_name: f"{plw:g}", "seed": seed})
        folder = run_dir(output_dir, plw, seed, config.seeds, config.axis_name)
        if resume and (folder / "done.json").is_file():
            all_events += read_events(folder / "metrics.jsonl")
            continue
        if seed not in datasets:
            datasets[seed] = load_splits(config, seed)
        initial = _initial_eval(all_events, seed) if config.share_initial_eval else None
        all_events += run_one(config, plw, folder, datasets[seed], seed, initial_eval=initial)
    first = config.seeds[0]
    n_eval = len(datasets[first][1])
    # Rg speaks to the prompt weight (the completion's share of the loss); a span sweep has no use for it.
    gen_ratio = None if config.sweeps_span else generation_ratio(datasets[first][0], config.model_name_or_path)
    return write_reports(config, all_events, output_dir, n_eval, gen_ratio, plots=plots, plot_name=plot_name)


RENAMED_FIELDS = {
    "model": "model_name_or_path",
    "dataset": "dataset_name",
    "train_split": "dataset_train_split",
    "eval_split": "dataset_test_split",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "warmup_ratio": "warmup_steps",
    "gradient_checkpointing": "activation_checkpointing",
}
"""SweepConfig fields that took their PLWConfig/TRL names: a config.json written before reads under the new names,
and the old command-line flags still work for one release (`trl_plw.cli.sweep.DEPRECATED_FLAGS`)."""

RESUMABLE_CHANGES = ("plws", "seeds")
"""Fields a resumed sweep may change: more weights or seeds add runs; any other change would mix two sweeps."""


def check_resumable(config: SweepConfig, output_dir: Path) -> None:
    """Refuse to resume ``output_dir`` with settings other than the ones its finished runs were trained with.

    A resumed sweep reads finished runs back instead of retraining them, so a changed learning rate, step count or
    dataset would silently put runs of two different sweeps into one table. Only finished runs (``done.json``)
    bind: a folder whose sweep never finished a run (a failed start, a run killed half-way, which is retrained
    from scratch anyway) takes the new settings.
    """
    path = output_dir / "config.json"
    if not path.is_file() or not any(output_dir.rglob("done.json")):
        return
    before = {RENAMED_FIELDS.get(k, k): v for k, v in json.loads(path.read_text()).items()}
    now = json.loads(json.dumps(asdict(config)))  # tuples as lists, as the file holds them
    changed = sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"{output_dir} holds a sweep run with other settings ({details}); resuming would mix two sweeps in one "
            "table. Use another --output_dir, or --no-resume to retrain every run."
        )


def _initial_eval(events: list[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """The step-0 evaluation some earlier run of ``seed`` computed itself (not a shared copy), if any."""
    return next(
        (
            e
            for e in events
            if e.get("seed", 0) == seed
            and e["step"] == 0
            and "eval_completion_loss" in e
            and "initial_eval_shared_from" not in e
        ),
        None,
    )


def write_reports(
    config: SweepConfig,
    events: list[dict[str, Any]],
    output_dir: Path,
    n_eval: int,
    gen_ratio: dict[str, Any] | None = None,
    *,
    plots: bool = True,
    plot_name: str = "sweep.png",
) -> dict[str, Any]:
    """metrics.csv, summary.json/md (findings, recommendation) and the plot, from the events of every run."""
    write_csv(events, output_dir / "metrics.csv")
    summary = summarize(events, config.plws, n_eval)
    span = config.sweep_weight if config.sweeps_span else None
    recommendation = recommend(summary, gen_ratio, span=span)
    table = summary_markdown(summary, span=span)
    findings = findings_markdown(summary, span=span)
    parts = [table, findings, recommendation["text"]]
    if span is not None:
        parts.insert(0, f"Swept: the weight of span rule `{span}` (column `{axis_label(span)}` below); the prompt "
                        f"loss weight is fixed ({config.extra.get('prompt_loss_weight', 'unset')}).")  # fmt: skip
    text = "\n\n".join(parts)
    (output_dir / "summary.json").write_text(
        json.dumps(
            {"swept": config.sweep_weight, "rows": summary, "gen_ratio": gen_ratio, "recommendation": recommendation},
            indent=1,
        )
        + "\n"
    )
    (output_dir / "summary.md").write_text(text + "\n")
    if plots:
        plot_sweep(events, config.plws, output_dir / plot_name, span=span)
    return {"summary": summary, "table_markdown": table, "text": text, "events": events,
            "recommendation": recommendation}  # fmt: skip


def generation_ratio(train: Any, model: str, max_examples: int = 1000) -> dict[str, Any] | None:
    """Rg of (up to ``max_examples`` of) the training split with the model's tokenizer, for the recommendation.

    None for plain-text data (the prompt/completion split is found by the response template inside the trainer);
    an ``error`` entry where it cannot be measured, because a report must not fail for a side statistic.
    """
    if "text" in train.column_names:
        return None
    try:
        from trl_plw.experiments.gen_ratio import compute_generation_ratios, summarize_ratios
        from trl_plw.experiments.offline_model import load_tokenizer

        ratios = compute_generation_ratios(train.select(range(min(len(train), max_examples))), load_tokenizer(model))
        summary = summarize_ratios(ratios)
    except (ValueError, KeyError, OSError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    keys = ("n", "mean", "median", "ratio_of_totals", "prompt_tokens_mean", "completion_tokens_mean")
    return {k: summary[k] for k in keys}


# ---------------------------------------------------------------------------------------------------------- stats
def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: honest at small n and near 0 or 1, unlike p ± z·se."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eval_events(events: list[dict[str, Any]], plw: float, seed: int | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["plw"] == plw and "eval_completion_loss" in e and (seed is None or e.get("seed", 0) == seed)
    ]


ACCURACY_KEYS = ("eval_answer_accuracy", "eval_completion_accuracy")


def _accuracy_key(evals: list[dict[str, Any]]) -> str:
    return next((k for k in ACCURACY_KEYS if evals and k in evals[0]), ACCURACY_KEYS[0])


def _pooled(values: list[float], n: int, binomial: bool) -> dict[str, Any]:
    """Mean over seeds, and the Wilson interval of the pooled successes (binomial accuracies only)."""
    mean = sum(values) / len(values) if values else math.nan
    if not binomial or not values:
        return {"value": mean, "ci": [math.nan, math.nan], "per_seed": values}
    k = sum(round(v * n) for v in values)
    return {"value": mean, "ci": list(wilson_interval(k, n * len(values))), "per_seed": values}


def summarize(events: list[dict[str, Any]], plws: Sequence[float], n_eval: int | None = None) -> list[dict[str, Any]]:
    """Per weight, pooled over seeds: the article's three findings and the final losses.

    * ``acc_at_min_seq_loss`` / ``acc_at_min_comp_loss`` (+ ``_step``): accuracy at the evaluation where the
      full-sequence / completion loss is lowest (the two stopping rules);
    * ``steps_to_min_comp_loss``: the step of that completion-loss minimum (mean over seeds);
    * ``best_acc``: the highest accuracy over the evaluations (an optimistic estimate: a max over noisy points).

    With answer accuracy and ``n_eval`` (items per evaluation), accuracies carry Wilson 95% intervals (``*_ci``);
    token-level completion accuracy, used when the data has no single-token answers, gets none (its tokens are
    not independent trials).
    """
    rows = []
    for plw in plws:
        evals_all = eval_events(events, plw)
        if not evals_all:
            continue
        acc_key = _accuracy_key(evals_all)
        binomial = acc_key == "eval_answer_accuracy" and n_eval is not None
        seeds = sorted({e.get("seed", 0) for e in evals_all})
        per_seed: dict[str, list[float]] = {}
        for seed in seeds:
            evals = eval_events(events, plw, seed)
            for loss_key, label in (("eval_sequence_loss", "seq"), ("eval_completion_loss", "comp")):
                best = min((e for e in evals if loss_key in e), key=lambda e: e[loss_key])
                per_seed.setdefault(f"min_{label}_loss", []).append(best[loss_key])
                per_seed.setdefault(f"min_{label}_loss_step", []).append(best["step"])
                per_seed.setdefault(f"acc_at_min_{label}_loss", []).append(best.get(acc_key, math.nan))
            per_seed.setdefault("best_acc", []).append(max(e.get(acc_key, math.nan) for e in evals))
            per_seed.setdefault("best_acc_step", []).append(max(evals, key=lambda e: e.get(acc_key, -1))["step"])
            per_seed.setdefault("initial_acc", []).append(evals[0].get(acc_key, math.nan))
            per_seed.setdefault("final_acc", []).append(evals[-1].get(acc_key, math.nan))
            per_seed.setdefault("final_prompt_loss", []).append(evals[-1].get("eval_prompt_loss", math.nan))
            per_seed.setdefault("final_completion_loss", []).append(evals[-1].get("eval_completion_loss", math.nan))
            per_seed.setdefault("epoch_at_min_comp_loss", []).append(
                next(
                    (e.get("epoch", math.nan) for e in evals if e["step"] == per_seed["min_comp_loss_step"][-1]),
                    math.nan,
                )  # fmt: skip
            )
            wall = [e["wall_seconds"] for e in events if e["plw"] == plw and e.get("seed", 0) == seed
                    and "wall_seconds" in e]  # fmt: skip
            per_seed.setdefault("train_seconds", []).append(wall[-1] if wall else math.nan)
        row: dict[str, Any] = {"plw": plw, "accuracy_metric": acc_key, "n_eval": n_eval, "seeds": seeds}
        for key, values in per_seed.items():
            is_acc = key.endswith("acc") or key.startswith("acc_at")
            if is_acc:
                pooled = _pooled(values, n_eval or 0, binomial)
                row[key], row[f"{key}_ci"] = pooled["value"], pooled["ci"]
            else:
                row[key] = sum(values) / len(values)
            if len(seeds) > 1:
                row[f"{key}_per_seed"] = values
        row["steps_to_min_comp_loss"] = row["min_comp_loss_step"]
        rows.append(row)
    return rows


def axis_label(span: str | None = None) -> str:
    """What the swept value is called in tables, findings and legends: ``PLW``, or ``<rule> weight`` for a span."""
    return "PLW" if span is None else f"{span} weight"


def _fmt_acc(row: dict[str, Any], key: str) -> str:
    value, ci = row.get(key, math.nan), row.get(f"{key}_ci", [math.nan, math.nan])
    text = f"{value:.3f}"
    if not math.isnan(ci[0]):
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def summary_markdown(rows: list[dict[str, Any]], *, span: str | None = None) -> str:
    """The stopping-rule table: one row per weight, accuracies with Wilson 95% intervals where binomial."""
    header = (
        f"| {axis_label(span)} | acc @ min seq loss (step) | acc @ min completion loss (step) | best acc (step) | "
        "initial acc | final acc | final prompt loss | final completion loss | train s |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['plw']:g} | {_fmt_acc(r, 'acc_at_min_seq_loss')} ({r.get('min_seq_loss_step', math.nan):g}) "
            f"| {_fmt_acc(r, 'acc_at_min_comp_loss')} ({r.get('min_comp_loss_step', math.nan):g}) "
            f"| {_fmt_acc(r, 'best_acc')} ({r.get('best_acc_step', math.nan):g}) "
            f"| {r['initial_acc']:.3f} | {r['final_acc']:.3f} | {r['final_prompt_loss']:.3f} "
            f"| {r['final_completion_loss']:.4f} | {r['train_seconds']:.0f} |"
        )
    if rows:
        metric = rows[0]["accuracy_metric"].removeprefix("eval_")
        seeds = rows[0]["seeds"]
        lines.append(
            f"\naccuracy = {metric} on {rows[0]['n_eval']} evaluation items; [lo, hi] = Wilson 95% interval"
            + (f", pooled over seeds {seeds} (values are seed means)" if len(seeds) > 1 else "")
            + "; steps are means over seeds."
        )
    return "\n".join(lines)


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[1] < b[0] or b[1] < a[0])


def findings_markdown(rows: list[dict[str, Any]], *, span: str | None = None) -> str:
    """The article's three findings, each stated as what was measured and whether the intervals separate."""
    if not rows:
        return ""
    label = axis_label(span)
    lines = [
        "Findings (the article's claims, tested on this sweep):"
        if span is None
        else f"Findings (measured on this sweep; the article's claims are about the prompt weight, not `{span}`):"
    ]
    diffs = [r["acc_at_min_comp_loss"] - r["acc_at_min_seq_loss"] for r in rows]
    separated = [
        r["plw"] for r in rows
        if not _overlap(r["acc_at_min_comp_loss_ci"], r["acc_at_min_seq_loss_ci"])
        and r["acc_at_min_comp_loss"] > r["acc_at_min_seq_loss"]
    ]  # fmt: skip
    lines.append(
        "1. Stopping rule: accuracy at the completion-loss minimum minus at the full-sequence-loss minimum is "
        + ", ".join(f"{d:+.3f} ({label} {r['plw']:g})" for d, r in zip(diffs, rows, strict=True))
        + (
            f"; intervals separate for {label} {', '.join(f'{p:g}' for p in separated)}."
            if separated
            else "; no weight has separated intervals."
        )  # fmt: skip
    )
    lines.append(
        "2. Steps to the completion-loss minimum: "
        + ", ".join(f"{r['steps_to_min_comp_loss']:g} ({label} {r['plw']:g})" for r in rows)
        + "."
    )
    best = max(rows, key=lambda r: r["best_acc"])
    tied = [r["plw"] for r in rows if r is not best and _overlap(r["best_acc_ci"], best["best_acc_ci"])]
    lines.append(
        f"3. Best accuracy: highest at {label} {best['plw']:g} ({_fmt_acc(best, 'best_acc')})"
        + (f"; within its interval: {label} {', '.join(f'{p:g}' for p in tied)}." if tied else "; above every other.")
    )
    return "\n".join(lines)


def recommend(
    rows: list[dict[str, Any]], gen_ratio: dict[str, Any] | None, *, span: str | None = None
) -> dict[str, Any]:
    """A weight and its evidence: the best accuracy at the completion-loss minimum (the article's stopping rule).

    Ties (overlapping intervals) go to the weight the article's advice prefers: for data with a small generation
    ratio, a small non-zero weight (0.1 beats 0 and 1 there); the evidence lists every weight that cannot be told
    apart, so the user sees how firm the choice is. The article says nothing about a span's weight (``span``), so
    there a tie goes to the highest measured accuracy and the generation ratio, a prompt/completion statistic, is
    left out.
    """
    if not rows:
        return {"plw": None, "text": "No finished runs: nothing to recommend."}
    key = "acc_at_min_comp_loss"
    top = max(rows, key=lambda r: r[key])
    tied = [r for r in rows if _overlap(r[f"{key}_ci"], top[f"{key}_ci"])] if not math.isnan(top[f"{key}_ci"][0]) \
        else [top]  # fmt: skip
    # Among statistically tied prompt weights prefer the one nearest 0.1 on a log scale (the article's advice),
    # which the data cannot overrule when intervals overlap; a span has no such prior.
    nearest_tenth = min(tied, key=lambda r: abs(math.log10(max(r["plw"], 1e-3)) - math.log10(0.1)))
    choice = nearest_tenth if span is None else top
    label = axis_label(span)
    rg = (gen_ratio or {}).get("ratio_of_totals") if span is None else None
    what = "prompt-loss weight" if span is None else f"weight of span rule `{span}`"
    lines = [f"Recommended {what}: **{choice['plw']:g}**."]
    lines.append(
        f"- Evidence: accuracy at the completion-loss minimum {_fmt_acc(choice, key)} at step "
        f"{choice['min_comp_loss_step']:g}; highest measured: {label} {top['plw']:g} ({_fmt_acc(top, key)})."
    )
    if len(tied) > 1:
        lines.append(
            f"- Not distinguishable at this evaluation size (overlapping 95% intervals): {label} "
            + ", ".join(f"{r['plw']:g}" for r in tied)
            + (
                "; among them the choice follows the article (a small non-zero weight)."
                if span is None
                else "; the article gives no prior for a span's weight, so the highest measured is named."
            )
        )
    if rg is not None:
        share = {r["plw"]: rg / (r["plw"] + rg) for r in rows}
        lines.append(
            f"- Generation ratio of the training data: ratio of totals Rt = {rg:.4g} (mean Rg "
            f"{gen_ratio['mean']:.4g}); completion share of the loss weight Rt/(w+Rt): "
            + ", ".join(f"{s:.1%} (PLW {w:g})" for w, s in share.items())
            + ("." if rg < 0.5 else "; with Rg this large the prompt weight changes little (the article).")
        )
    # Learned = the best interval clears the interval of the accuracy before training (step 0).
    learned = math.isnan(top[f"{key}_ci"][0]) or not _overlap(top[f"{key}_ci"], top["initial_acc_ci"])
    if not learned:
        lines.insert(
            1,
            "- **Weak evidence**: the best interval overlaps that of the accuracy before training (the "
            "model did not measurably learn the task), so this is "
            + ("the article's prior" if span is None else "the largest of noisy measurements")
            + ", not a finding.",
        )
    lines.append("- Stop on the validation completion loss, not on the full-sequence loss.")
    return {"plw": choice["plw"], "tied": [r["plw"] for r in tied], "learned": learned, "text": "\n".join(lines)}


# ---------------------------------------------------------------------------------------------------------- files
def write_csv(events: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for event in events:
        keys += [k for k in event if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(events)


def seed_curves(events: list[dict[str, Any]], plw: float, key: str) -> dict[int, dict[int, float]]:
    """``{seed: {step: value}}`` of one metric of one weight's evaluations (what `plot_sweep` draws)."""
    curves: dict[int, dict[int, float]] = {}
    for e in eval_events(events, plw):
        if key in e:
            curves.setdefault(e.get("seed", 0), {})[e["step"]] = e[key]
    return curves


def plot_sweep(events: list[dict[str, Any]], plws: Sequence[float], path: Path, *, span: str | None = None) -> None:
    """Four panels like the article's figures: prompt, completion, full-sequence loss and accuracy vs step.

    With several seeds, each curve is the seed mean at each step, and each seed is drawn thin behind it: a mean of
    one run that learned and one that did not looks like a slow learner, the thin lines show which it is.
    """
    from trl_plw.experiments import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = _accuracy_key(eval_events(events, plws[0]) if plws else [])
    panels = (
        ("eval_prompt_loss", "validation prompt loss"),
        ("eval_completion_loss", "validation completion loss"),
        ("eval_sequence_loss", "validation full-sequence loss"),
        (acc_key, acc_key.removeprefix("eval_").replace("_", " ")),
    )
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colors = plt.cm.viridis([i / max(1, len(plws) - 1) for i in range(len(plws))])
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for plw, color in zip(plws, colors, strict=True):
            curves = seed_curves(events, plw, key)
            by_step: dict[int, list[float]] = {}
            for curve in curves.values():
                for step, value in curve.items():
                    by_step.setdefault(step, []).append(value)
                if len(curves) > 1:
                    ax.plot(sorted(curve), [curve[x] for x in sorted(curve)], color=color, lw=0.8, alpha=0.35)
            if by_step:
                xs = sorted(by_step)
                ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], marker="o", ms=3, color=color,
                        label=f"{axis_label(span)}={plw:g}")  # fmt: skip
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
