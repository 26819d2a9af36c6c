"""Command-line entry point: a thin layer over the public Python API."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphprune")
def main() -> None:
    """graphprune: structured channel pruning with measured speed-ups."""


if __name__ == "__main__":  # pragma: no cover
    main()
