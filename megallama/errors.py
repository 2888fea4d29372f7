"""User-facing errors.

A ``ConfigError`` is a user mistake (bad flag, missing file, wrong shape): the scripts print its message as one
line and exit with status 2 instead of a traceback.
"""


class ConfigError(ValueError):
    """A user mistake: the message names the bad value and the fix."""
