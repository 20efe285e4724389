"""``python -m fastcell``: the ``fastcell`` command."""

import sys

from fastcell.cli import main

sys.exit(main())
