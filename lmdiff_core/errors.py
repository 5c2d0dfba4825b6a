"""Errors that reach the user as one clear line (CLI exit code 2, a message in ComfyUI)."""


class LmdiffInputError(ValueError):
    """A user-supplied input is missing, malformed or unsuitable; the message names it and what was expected."""

    def __reduce__(self):  # pickled through this module's function, since __module__ below is not where it lives
        return _input_error, self.args


def _input_error(*args) -> LmdiffInputError:
    return LmdiffInputError(*args)


# ComfyUI names an error type "<module>.<qualname>" unless the module is builtins; inside ComfyUI this module's name
# is the pack's path, so the dialog would read ".../custom_nodes/lmdiff.lmdiff_core.errors.LmdiffInputError".
LmdiffInputError.__module__ = "builtins"
