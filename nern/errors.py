"""The one exception type a user can cause.

The CLI turns a `NernError` into a single line on stderr and exit status 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class NernError(Exception):
    """A problem with the user's input (paths, config, data, checkpoints), worded as one sentence with the fix."""
