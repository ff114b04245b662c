"""The one exception type that the command line turns into a clean message.

Raise `UserError` for anything a user can fix (a bad file, a bad option, a missing
checkpoint). `aiayn` prints ``aiayn: error: <message>`` and exits with status 2, with no
traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; the message says what to fix."""

    def __init__(self, message: str, *, path=None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
