"""``python -m mxmoe.claims``: the same as ``mxmoe claims``."""

import sys

from mxmoe.claims import main

sys.exit(main())
