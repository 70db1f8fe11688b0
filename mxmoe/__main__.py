"""``python -m mxmoe`` is the ``mxmoe`` command."""

import sys

from mxmoe.cli import main

sys.exit(main())
