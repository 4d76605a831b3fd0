"""The error a user can cause and fix (a bad path, a bad flag, the wrong checkpoint). Stdlib only and
in a file of its own, so that model files can raise it without importing the configuration system;
utils.run_cli turns it into one `error: ...` line and exit code 2 instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class EnvironmentFault(Exception):
    """A fault of the machine, not of the input (the disk full, the output turned read-only):
    one `error: ...` line saying what was saved last and how to go on, and exit code 1."""
