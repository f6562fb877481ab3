"""Prompt-loss-weight schedules: the prompt weight as a pure function of training progress.

A schedule is evaluated from ``(global_step, max_steps)`` alone, never from a running counter, so a run resumed from
a checkpoint (whose ``TrainerState`` restores ``global_step``) continues exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")


def prompt_weight_at(
    step: int, max_steps: int, start: float, end: float | None = None, kind: ScheduleKind = "constant"
) -> float:
    """Prompt weight at optimizer step ``step`` of ``max_steps``.

    ``linear`` and ``cosine`` move from ``start`` (step 0) to ``end`` (last step); cosine eases in and out
    (half a cosine period), which keeps the weight near ``start`` early and near ``end`` late.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"prompt_loss_weight_schedule={kind!r} is not one of {SCHEDULE_KINDS}.")
    if kind == "constant" or end is None or max_steps <= 0:
        return float(start)
    progress = min(max(step / max_steps, 0.0), 1.0)
    if kind == "linear":
        factor = progress
    else:
        factor = 0.5 * (1.0 - math.cos(math.pi * progress))
    return float(start + (end - start) * factor)
