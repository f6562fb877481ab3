"""Datasets for the prompt-loss-weight experiments: RACE (Hub or local) and an offline synthetic RACE.

Light at import: `datasets` is imported only when a loader runs.
"""

from __future__ import annotations

from trl_plw.experiments.data.race import (
    METADATA_COLUMNS,
    OPTION_TEMPLATE,
    RACE_CONFIGS,
    RACE_HUB_ID,
    RACE_PROMPT_TEMPLATE,
    RaceFormatError,
    answer_token_ids,
    answer_token_variants,
    format_race_example,
    format_race_prompt,
    load_race,
    load_raw_dataset,
    validate_race_row,
)
from trl_plw.experiments.data.synthetic_race import ANSWER_LETTERS, LENGTH_PRESETS, QUESTION_TYPES, generate_race_rows

__all__ = [
    "ANSWER_LETTERS",
    "LENGTH_PRESETS",
    "METADATA_COLUMNS",
    "OPTION_TEMPLATE",
    "QUESTION_TYPES",
    "RACE_CONFIGS",
    "RACE_HUB_ID",
    "RACE_PROMPT_TEMPLATE",
    "RaceFormatError",
    "answer_token_ids",
    "answer_token_variants",
    "format_race_example",
    "format_race_prompt",
    "generate_race_rows",
    "load_race",
    "load_raw_dataset",
    "validate_race_row",
]
