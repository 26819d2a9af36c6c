"""The one exception type users see: the CLI prints its message on one line and exits with code 2."""


class GraphpruneError(Exception):
    """One-line user-facing error; the CLI prints it and exits with code 2.

    Messages quote names from the input file, which may hold newlines, terminal escape sequences
    or U+2028: those are escaped (graphprune.escape.plain) so the message stays one harmless line
    whatever the model contains.
    """

    def __init__(self, message: object = "") -> None:
        from graphprune.escape import plain

        super().__init__(plain(message))


class SpeedupNotMet(GraphpruneError):
    """The measured speed-up is below --min-speedup: the CLI exits with code 3 and writes nothing."""

    exit_code = 3
