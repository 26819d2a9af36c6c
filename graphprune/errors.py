"""The one exception type users see: the CLI prints its message on one line and exits with code 2."""


class GraphpruneError(Exception):
    """One-line user-facing error; the CLI prints it and exits with code 2.

    Messages quote names from the input file, which may hold newlines: those are escaped so the
    message stays one line whatever the model contains.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message).replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(text)


class SpeedupNotMet(GraphpruneError):
    """The measured speed-up is below --min-speedup: the CLI exits with code 3 and writes nothing."""

    exit_code = 3
