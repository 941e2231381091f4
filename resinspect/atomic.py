"""Writing files so that a reader never sees half of one, and one-line errors at the output edge.

Kept apart from :mod:`resinspect.rundir` so that the results model (:mod:`resinspect.results`) can write
itself without importing anything that renders a report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["write_atomic", "output_error"]


def output_error(path: str | os.PathLike, action: str, e: OSError) -> OutputError:
    """One line for an operating-system error at the output edge: the path, what failed and why."""
    reason = e.strerror or str(e)
    return OutputError(f"output {path}: cannot {action}: {reason}")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``: readers never see half a file.

    An operating-system error (no permission, disk full, …) becomes :class:`OutputError` naming the path;
    the previous file, if any, is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, "write", e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
