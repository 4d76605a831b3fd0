"""The error a user can cause and fix (a bad path, a bad flag, the wrong checkpoint). Stdlib only and
in a file of its own, so that model files can raise it without importing the configuration system;
utils.run_cli turns it into one `error: ...` line and exit code 2 instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""
