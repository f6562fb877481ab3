#!/usr/bin/env python
"""End-to-end training throughput and peak memory: PLWTrainer vs trl.SFTTrainer vs a full-logits weighted loss.

A thin wrapper: the benchmark is ``trl_plw.experiments.benchmarking.throughput`` (it ships in the wheel so that ``trl-plw bench``
works from an installed package); see its docstring for what is measured and held equal. Every flag is the same.

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --repeats 3 --out throughput.json
"""

from __future__ import annotations

import os
import sys

# Run from a source checkout without installing: the checkout's src/ wins over any installed trl_plw.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from trl_plw.experiments.benchmarking.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
