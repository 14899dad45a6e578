"""User errors: bad input that the CLI reports as one line on stderr (exit code 2), no traceback."""


class DMFError(Exception):
    pass
