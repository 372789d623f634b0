"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, a checkpoint of the wrong
kind) is raised as a `KinemaError` whose message names the value and the fix.
The CLI prints the message alone and exits with code 2; library callers can
catch the one class.
"""


class KinemaError(Exception):
    """An error the user can fix; the message says what was wrong and what to do."""


class CheckpointError(KinemaError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class Cancelled(Exception):
    """A run stopped before its end: a step callback returned False, or the `cancel` event was set.
    Not a KinemaError: nothing was wrong with the request. Nothing is written for a cancelled run."""
