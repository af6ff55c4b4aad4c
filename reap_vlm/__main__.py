"""`python -m reap_vlm <command>`: the same as the `reap-vlm` console script (reap_vlm.command)."""

import sys

from .command import main

sys.exit(main())
