"""resinspect: measure why a residual network works.

Public API::

    import resinspect
    result = resinspect.run(model="resnet20", data="digits", plugins=["ablation"])

and, for plugin authors, ``hookimpl``, ``Section``, ``RunContext``, ``StashKey``.
"""

__version__ = "0.1.0"

from .anatomy import bypass, drop_skip, residual_blocks  # noqa: E402
from .context import RunContext, StashKey  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from .data import load_data  # noqa: E402
from .runner import RunResult, run  # noqa: E402
from .section import Figure, Finding, Section, Table  # noqa: E402

__all__ = ["run", "RunResult", "hookimpl", "Section", "Finding", "Table", "Figure", "RunContext", "StashKey",
           "residual_blocks", "bypass", "drop_skip", "build_model", "load_data", "load_checkpoint",
           "save_checkpoint", "__version__"]
