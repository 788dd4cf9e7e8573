"""One error type for everything a user can fix: the CLI prints its message and exits 2."""

import click


class BuilderError(click.ClickException):
    """Bad input or a failed step, with a message that says what to do."""

    exit_code = 2
