"""``python -m resinspect``: the command line (what a sweep's parallel jobs run)."""

from .cli import main

main()
