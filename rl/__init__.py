"""trustgrpo: Flow-GRPO for flow-matching image models. The pure math (sde, advantages, loss) and the training loop (train).

The import names `rl`, `rewards` and `models` are generic: a folder named models/ or rewards/ in
the working directory would be imported in place of trustgrpo's own packages. Importing rl checks
that both resolve beside it and stops with a message naming the folder otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _check_sibling_packages() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("models", "rewards"):
        spec = importlib.util.find_spec(name)
        found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
        if found != root / name:
            where = found or (list(spec.submodule_search_locations or []) if spec is not None else "nothing")
            raise ImportError(
                f"trustgrpo: `import {name}` finds {where}, not trustgrpo's own {root / name}: a folder named {name}/ "
                f"in the working directory (or earlier on sys.path) shadows it; run from another directory or rename that folder"
            )


_check_sibling_packages()
