"""Errors a user can cause: one sentence that names the cause and the fix."""


class UserError(Exception):
    """Raised for bad input (model spec, shapes, paths); the CLI prints it and exits with code 2."""
