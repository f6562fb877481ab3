"""Experiments and demo machinery, apart from the library: nothing in ``trl_plw``'s training path imports this.

* `race` / `sweep`: the RACE prompt-loss-weight experiment and the same sweep for any dataset;
* `data`: RACE formatting, offline synthetic RACE-format data, chat templates for dry runs;
* `gen_ratio`: generation-ratio statistics ("which prompt weight for my data?");
* `offline_model`: the offline demo model (SmolLM2-135M GGUF -> cached HF folder) and model/tokenizer loading that
  knows its alias (``load_model``, ``load_tokenizer``, ``load_model_and_tokenizer``).

The benchmarks live outside the package, in the repository's ``benchmarks/`` folder (``trl-plw bench`` runs them
from a checkout).

Plots need the ``plots`` extra (matplotlib), the offline model the ``offline`` extra (gguf).
"""


def require_matplotlib() -> None:
    """Raise a clear error, naming the extra, when a plot is asked for without matplotlib installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Plots need matplotlib: `pip install 'trl-plw[plots]'`, or pass --no-plots (the numbers are written anyway)."
        ) from err
