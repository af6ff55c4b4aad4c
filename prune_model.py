#!/usr/bin/env python3
"""Write a pruned checkpoint from reap_metadata.json by shard surgery; the model is never loaded.

Usage: python prune_model.py --model-path MODEL [--metadata-path M] [--pruned-model-path OUT] [...]; see --help."""

import sys

from reap_vlm.cli import main
from reap_vlm.prune import run

if __name__ == "__main__":
    sys.exit(main("prune", run, prog="prune_model.py"))
