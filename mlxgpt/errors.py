"""The one base class of every error whose message is meant for the user.

:class:`UserError` marks a problem the user can fix (a bad option, a missing file, a
corrupt checkpoint, ...). Its message says what is wrong and what to do. Both command
lines (``mlxgpt`` and ``mlxgpt-ort``) catch exactly this class and print it as one
``error: ...`` line with exit status 2; anything else is a bug and keeps its traceback.

Each module raises its own subclass (``ConfigError``, ``DataError``, ``CheckpointError``,
``TokenizerError``, ``ExportError``, ...). The subclasses also derive from ``ValueError``
(or ``RuntimeError``) where callers already expected that. This module imports nothing,
so MLX-free code (the onnxruntime runtime) can use it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names it and says how to fix it."""
