"""The one exception type users see: the CLI prints its message on one line and exits with code 2."""


class GraphpruneError(Exception):
    """One-line user-facing error; the CLI prints it and exits with code 2."""
