"""``import trl_plw`` is cheap and side-effect free; the public names still resolve (lazily)."""

from __future__ import annotations

import subprocess
import sys

from conftest import subprocess_env

# Runs in a fresh interpreter: this test process has imported everything already.
CHILD = """
import sys
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

def registries():
    return set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)

before = registries()
import trl_plw
assert "matplotlib" not in sys.modules, "import trl_plw imported matplotlib"
assert "trl" not in sys.modules and "trl_plw.trainer" not in sys.modules, "import trl_plw imported TRL"
assert registries() == before, registries()
for name in trl_plw.__all__:
    assert getattr(trl_plw, name) is not None, name
assert set(trl_plw.__all__) == {*trl_plw._EXPORTS, "__version__"}
assert set(trl_plw.__all__) <= set(dir(trl_plw))
assert trl_plw.PLWTrainer.__name__ == "PLWTrainer" and trl_plw.VARLEN_ATTENTION == "plw_varlen"
assert "matplotlib" not in sys.modules, "a public name imported matplotlib"
assert registries() == before, ("resolving the public names registered attention backends", registries())
print("ok")
"""


def test_import_is_lazy_and_registers_nothing():
    result = subprocess.run(
        [sys.executable, "-c", CHILD], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
