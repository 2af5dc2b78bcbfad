"""``python -m monai_ext <command>``: the command-line front end.

The commands ``register`` and ``evaluate`` come from :mod:`monai_ext.cli`, ``demo`` from :mod:`monai_ext.demo`
(which builds on :func:`monai_ext.cli.run_bundle`); this module joins them, so neither of the two imports the
other's command table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from monai_ext.cli import evaluate, register
from monai_ext.cli import main as run_command
from monai_ext.demo import demo

__all__ = ["COMMANDS", "main"]

COMMANDS = {"register": register, "evaluate": evaluate, "demo": demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``) with :data:`COMMANDS`; returns the exit status of
    :func:`monai_ext.cli.main`."""
    return run_command(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
