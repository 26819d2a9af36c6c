"""`python -m graphprune ...` runs the CLI, the same as the `graphprune` command."""
from graphprune.cli import main

if __name__ == "__main__":
    main(prog_name="graphprune")
