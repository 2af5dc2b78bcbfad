"""``python -m monai_ext <command>``: the command-line front end (:mod:`monai_ext.cli`)."""

import sys

from monai_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
