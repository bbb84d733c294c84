"""mmjax's own error types: the only ones the CLI turns into a one-line `mmjax: error:` message.

Why a hierarchy of our own: a user error (a bad config value, a stage run out of order, an
unreadable file) deserves one line that names the field, stage or path; an internal bug deserves
its traceback. Catching `ValueError`/`OSError` wholesale would hide bugs behind "bad input", so
code that diagnoses a user's mistake raises one of these, and everything else propagates.

Each type also subclasses the builtin it refines (ValueError, FileNotFoundError, OSError), so
callers of the Python API can keep catching the builtin.
"""
from __future__ import annotations


class MmjaxError(Exception):
    """Base class: an expected failure mmjax explains in one sentence (CLI exit code 2)."""


class InputError(MmjaxError, ValueError):
    """A value, file or dataset given to mmjax cannot be used as it is."""


class MissingArtifactError(InputError, FileNotFoundError):
    """A stage's input does not exist yet: the message names the stage (`--mode=...`) to run."""


class StorageError(MmjaxError, OSError):
    """A path cannot be read or written (permissions, a full disk, no such bucket, no network)."""
