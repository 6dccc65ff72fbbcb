"""``python -m memories``: the ``memserve memory`` commands, usable before the server CLI is wired."""

import sys

from memories.cli import main

sys.exit(main())
