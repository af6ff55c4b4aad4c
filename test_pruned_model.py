#!/usr/bin/env python3
"""Test a pruned checkpoint: generation, degeneration, agreement with the original, report.

Usage: python test_pruned_model.py [--pruned-model-path P] [--original-model-path M] [...]; see --help.
Exit code: 0 pass, 1 fail (the failing checks are listed), 2 usage error."""

import sys

from reap_vlm.cli import main
from reap_vlm.evaluate import run

if __name__ == "__main__":
    sys.exit(main("test", run, prog="test_pruned_model.py"))
