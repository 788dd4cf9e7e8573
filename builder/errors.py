"""One error type for everything a user can fix. Library code raises it; the CLI alone turns it into
its message on stderr and exit status 2."""


class BuilderError(Exception):
    """Bad input or a failed step, with a message that says what to do."""

    exit_code = 2
