"""The one exception type for mistakes a user can fix (bad path, bad file, bad flag)."""


class UserError(ValueError):
    """A problem with the user's input, told in one sentence that names the file and the fix.

    The CLI prints the message without a traceback and exits with status 1.
    """


def run_main(main) -> None:
    """Runs a script's main() (the bench/ scripts): a UserError ends it with "Error: " and its
    one sentence, exit status 1, no traceback, as the CLI does."""
    try:
        main()
    except UserError as error:
        raise SystemExit(f"Error: {error}") from None
