"""The errors of the ONNX exporter and runtime: problems a user can fix, with messages that say how.

``mlxgpt export`` and ``mlxgpt-ort`` print them as one ``error: ...`` line (exit status 2)
instead of a traceback. All derive from :class:`ExportError`, so one ``except`` catches them.
"""

from __future__ import annotations

from mlxgpt.errors import UserError


class ExportError(UserError, ValueError):
    """Exporting failed, or an exported model cannot be used; the message says why."""


class ExportFolderError(ExportError):
    """An export folder that is missing, incomplete or corrupt (the message names the file)."""


class InputError(ExportError):
    """Inputs the exported model cannot take: token ids out of range, too long a sequence, ..."""
