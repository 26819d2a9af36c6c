"""Re-measure the channel-multiple table shipped with graphprune (the data behind `--round-to auto`).

    python benchmarks/channel_table.py                    # ort-cpu, plus cuda-fp16 where a GPU is visible
    python benchmarks/channel_table.py --hardware ort-cpu

Writes graphprune/backends/channel_multiples.json (the shipped table). Users re-measure their own
machine with `graphprune calibrate`, which writes to their cache instead.
"""
from __future__ import annotations

import sys

from graphprune.backends.channel_table import SHIPPED
from graphprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", "-o", str(SHIPPED), *sys.argv[1:]]))
