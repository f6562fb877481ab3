"""``python -m trl_plw.cli``: the same as the ``trl-plw`` command."""

import sys

from trl_plw.cli import main

sys.exit(main())
