"""Errors that reach the user as one clear line (CLI exit code 2, a message in ComfyUI)."""


class LmdiffInputError(ValueError):
    """A user-supplied input is missing, malformed or unsuitable; the message names it and what was expected."""
