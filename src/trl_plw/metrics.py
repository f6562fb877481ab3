"""Prompt / completion metrics accumulated from the fused loss's per-token statistics, never from logits.

Sums and counts are accumulated on the device across micro-batches and evaluation batches, and reduced across
processes once, when metrics are logged: a mean of per-batch means would weight small batches too much, and a
host sync per batch would stall the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Order of the accumulator's slots; `reduce_fn` receives them as one vector so one collective call suffices.
_FIELDS = (
    "weighted_loss_sum",  # sum(w * ce) over scored tokens
    "weight_sum",  # sum(w)
    "nonzero_weight_count",  # count(w != 0)
    "prompt_ce_sum",
    "prompt_count",
    "completion_ce_sum",
    "completion_count",
    "completion_correct",
    "answer_correct",
    "answer_count",
    "trained_correct",  # TRL's mean_token_accuracy: argmax hits over the trained (non-zero weight) targets
    "trained_count",
)


class SplitMetrics:
    """Running sums for the prompt/completion split; ``compute`` turns them into the reported metrics.

    ``span_names`` are the names of the span rules (`trl_plw.spans`), in bit order; each named one also gets the
    cross-entropy sum and count of the scored tokens it covers (``span_<name>_loss``), appended to the same vector."""

    def __init__(self, span_names: tuple[str | None, ...] = ()) -> None:
        self._sums: torch.Tensor | None = None
        self._spans = [(bit, name) for bit, name in enumerate(span_names) if name is not None]

    def reset(self) -> None:
        self._sums = None

    @property
    def empty(self) -> bool:
        return self._sums is None

    @torch.no_grad()
    def update(
        self,
        token_ce: torch.Tensor,
        is_argmax: torch.Tensor,
        scored: torch.Tensor,
        weights: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        answer_mask: torch.Tensor | None = None,
        token_spans: torch.Tensor | None = None,
    ) -> None:
        """All arguments are aligned per predicted token (already shifted) and of the same shape; ``token_spans``
        holds the bit mask of the span rules covering each token."""
        # float64 where the device has it: the sums are then exact to float64 rounding whatever the batch layout
        # (MPS has no float64; float32 sums differ across layouts by ~1e-7 relative).
        dtype = torch.float32 if token_ce.device.type == "mps" else torch.float64
        ce = token_ce.to(dtype)
        w = weights.to(dtype) * scored
        prompt = prompt_mask & scored
        completion = completion_mask & scored
        correct = is_argmax & completion
        parts = [
            (w * ce).sum(),
            w.sum(),
            (w != 0).sum(),
            (ce * prompt).sum(),
            prompt.sum(),
            (ce * completion).sum(),
            completion.sum(),
            correct.sum(),
        ]
        if answer_mask is not None:
            answer = answer_mask & completion
            parts += [(is_argmax & answer).sum(), answer.sum()]
        else:
            parts += [ce.new_zeros(()), ce.new_zeros(())]
        trained = scored & (weights != 0)
        parts += [(is_argmax & trained).sum(), trained.sum()]
        for bit, _ in self._spans:
            if token_spans is None:
                parts += [ce.new_zeros(()), ce.new_zeros(())]
                continue
            covered = ((token_spans.to(scored.device) >> bit) & 1).bool() & scored
            parts += [(ce * covered).sum(), covered.sum()]
        sums = torch.stack([p.to(torch.float64) for p in parts])
        self._sums = sums if self._sums is None else self._sums + sums

    def compute(
        self,
        reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        normalization: str = "weights",
        include_prompt: bool = True,
        include_answer: bool = False,
    ) -> dict[str, float]:
        """Metrics without prefix: ``loss`` (weighted, with the trainer's normalization), ``prompt_loss``,
        ``completion_loss``, ``sequence_loss`` (mean CE over prompt and completion tokens), ``completion_accuracy``,
        ``mean_token_accuracy`` (TRL's metric: argmax accuracy over the trained targets), optionally
        ``answer_accuracy``, and ``span_<name>_loss`` (mean CE over the scored tokens of each named span, whatever
        their weight). Quantities with an empty denominator are left out rather than
        reported as 0, which would read as a perfect loss."""
        if self._sums is None:
            return {}
        sums = self._sums if reduce_fn is None else reduce_fn(self._sums)
        values = sums.tolist()
        s = dict(zip(_FIELDS, values[: len(_FIELDS)], strict=True))
        span_sums = values[len(_FIELDS) :]
        out: dict[str, float] = {}
        denominator = s["weight_sum"] if normalization == "weights" else s["nonzero_weight_count"]
        out["loss"] = s["weighted_loss_sum"] / denominator if denominator > 0 else 0.0
        if include_prompt and s["prompt_count"] > 0:
            out["prompt_loss"] = s["prompt_ce_sum"] / s["prompt_count"]
        if s["completion_count"] > 0:
            out["completion_loss"] = s["completion_ce_sum"] / s["completion_count"]
            out["completion_accuracy"] = s["completion_correct"] / s["completion_count"]
        if include_prompt and s["prompt_count"] + s["completion_count"] > 0:
            out["sequence_loss"] = (s["prompt_ce_sum"] + s["completion_ce_sum"]) / (
                s["prompt_count"] + s["completion_count"]
            )
        if s["trained_count"] > 0:  # under TRL's name, so metric_for_best_model="eval_mean_token_accuracy" works
            out["mean_token_accuracy"] = s["trained_correct"] / s["trained_count"]
        if include_answer and s["answer_count"] > 0:
            out["answer_accuracy"] = s["answer_correct"] / s["answer_count"]
        for i, (_, name) in enumerate(self._spans):
            ce_sum, count = span_sums[2 * i], span_sums[2 * i + 1]
            if count > 0:
                out[f"span_{name}_loss"] = ce_sum / count
        return out
