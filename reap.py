#!/usr/bin/env python3
"""Score every expert of a MoE model on calibration data and write reap_metadata.json.

Usage: python reap.py --model-path MODEL [--scoring-mode full|routed|router] [...]; see --help."""

import sys

from reap_vlm.cli import main
from reap_vlm.reap import run

if __name__ == "__main__":
    sys.exit(main("reap", run, prog="reap.py"))
