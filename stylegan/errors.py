"""The one exception type for mistakes a user can fix (bad path, bad file, bad flag)."""


class UserError(ValueError):
    """A problem with the user's input, told in one sentence that names the file and the fix.

    The CLI prints the message without a traceback and exits with status 1.
    """
