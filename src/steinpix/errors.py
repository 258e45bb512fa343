"""Errors that the CLI reports as one line, without a traceback."""


class SteinpixError(Exception):
    """A problem with the user's input (a file, an option) that steinpix explains in one line.

    The message names the file and what is wrong with it; the CLI prints it as
    ``Error: <message>`` and exits with :attr:`exit_code`.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
