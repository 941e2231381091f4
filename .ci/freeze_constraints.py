"""Write .ci/constraints.txt: the exact installed version of every package the project and its
test extra need, directly or through their dependencies (nothing else that happens to be installed).

Refresh after upgrading on a machine where the suite passes:

    python -m pip install -U -e ".[test]" && python .ci/freeze_constraints.py
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = "resinspect"
EXTRAS = {"test"}
# installed by .ci/run itself before the project
TOOLS = ("setuptools", "wheel")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: md.Distribution, extras: set[str]) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker is not None:
            env_extras = extras or {""}
            if not any(req.marker.evaluate({"extra": e}) for e in env_extras):
                continue
        names.append(req.name)
    return names


def closure() -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(ROOT, EXTRAS)] + [(t, set()) for t in TOOLS]
    while todo:
        name, extras = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not used on this platform
        key = _norm(dist.metadata["Name"])
        if key in pinned:
            continue
        pinned[key] = dist.version
        todo.extend((n, set()) for n in _requirements(dist, extras))
    pinned.pop(ROOT, None)
    return dict(sorted(pinned.items()))


def main() -> int:
    out = Path(__file__).with_name("constraints.txt")
    lines = [f"{n}=={v}" for n, v in closure().items()]
    out.write_text("# Exact versions the test suite last passed with; refresh with .ci/freeze_constraints.py\n"
                   + "\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
