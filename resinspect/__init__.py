"""resinspect: measure why a residual network works.

Public API::

    import resinspect
    result = resinspect.run(model="resnet20", data="digits", plugins=["ablation"])

and, for plugin authors, everything in ``__all__``: ``hookimpl``, ``Section`` and its parts, ``RunContext``,
``StashKey``, the residual anatomy (``residual_blocks``, ``ResidualBlock``, ``block_module``, ``NoHead`` for
``ctx.head()``), the probes (``capture``,
``capture_batches``, ``on_forward``, ``block_vjp``, ``BlockLinearization``, ``gradient_split``,
``eval_mode``, the switches ``bypass`` / ``drop_skip`` / ``forwards_replaced``, the type checks),
``svd_multiply_adds`` (for ``resinspect_estimate``) and ``pyplot``. A plugin imports only these names
(``from resinspect import ...``), built-in plugins included.
"""

__version__ = "0.1.0"

from .anatomy import (
    Blocks,
    NoResidualBlocks,
    ResidualBlock,
    block_module,
    bypass,
    drop_skip,
    forwards_replaced,  # noqa: E402
    no_blocks_reason,
    require_blocks,
    residual_blocks,
    untraced_note,
)
from .compare import Comparison, compare  # noqa: E402
from .context import RunContext, StashKey  # noqa: E402
from .data import DataBundle, load_data  # noqa: E402
from .errors import ResinspectError  # noqa: E402
from .estimate import svd_multiply_adds  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from .probes import (
    BlockLinearization,
    Captured,
    assert_clean,
    block_vjp,
    capture,
    capture_batches,  # noqa: E402
    eval_mode,
    gradient_split,
    hooks_left,
    is_batchnorm,
    is_conv,
    is_linear,
    linear_weight,
    on_forward,
)
from .readout import NoHead  # noqa: E402
from .results import Results  # noqa: E402
from .runner import RunResult, run  # noqa: E402
from .section import Figure, Finding, Section, Table, pyplot  # noqa: E402
from .settings import RunSettings  # noqa: E402
from .sweep import SweepResult, sweep  # noqa: E402
from .task import CLASSIFICATION, NEXT_TOKEN, Task, cross_entropy  # noqa: E402

__all__ = [
    "svd_multiply_adds",
    "Task",
    "CLASSIFICATION",
    "NEXT_TOKEN",
    "cross_entropy",
    "run",
    "sweep",
    "SweepResult",
    "compare",
    "Comparison",
    "RunResult",
    "RunSettings",
    "Results",
    "hookimpl",
    "Section",
    "Finding",
    "Table",
    "Figure",
    "pyplot",
    "RunContext",
    "StashKey",
    "DataBundle",
    "ResinspectError",
    "residual_blocks",
    "require_blocks",
    "ResidualBlock",
    "NoResidualBlocks",
    "Blocks",
    "no_blocks_reason",
    "untraced_note",
    "block_module",
    "NoHead",
    "bypass",
    "drop_skip",
    "forwards_replaced",
    "eval_mode",
    "on_forward",
    "capture",
    "Captured",
    "capture_batches",
    "block_vjp",
    "BlockLinearization",
    "gradient_split",
    "is_batchnorm",
    "is_conv",
    "is_linear",
    "linear_weight",
    "hooks_left",
    "assert_clean",
    "build_model",
    "load_data",
    "load_checkpoint",
    "save_checkpoint",
    "__version__",
]
