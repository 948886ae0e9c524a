"""Registry of the ``mixdefense <tool>`` commands (beside the Lightning ones).

Each tool is ``fn(argv: list[str]) -> int`` with its own argparse parser; it is imported
lazily so that ``mixdefense --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def _lazy(module: str, attr: str = "main") -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), attr)(argv)

    return run


TOOLS: dict[str, tuple[Callable[[list[str]], int], str]] = {}
