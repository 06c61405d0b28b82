"""Errors the CLI reports in one sentence that names the cause and the fix (no traceback)."""


class UserError(Exception):
    """Raised for bad input (model spec, shapes, paths); the CLI prints it and exits with code 2."""


class RankFailure(Exception):
    """A process of a multi-process run stopped or stalled; the CLI prints it and exits with code 1."""
