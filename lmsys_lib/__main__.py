"""``python -m lmsys_lib`` is the ``lmsys`` command."""

import sys

from .cli import main

sys.exit(main())
