"""Compare the results.json of two sets of runs, job by job: the test mean, CI and best validation
value, and the largest difference over every curve, so a refactoring can show it left the numbers
as they were (scripts/family_smoke_runs.sh makes the two sets).

    python scripts/compare_results.py OLD_DIR NEW_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}[{i}]").items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def main(old_dir: Path, new_dir: Path) -> int:
    volatile = ("wall_seconds",)
    for old in sorted(old_dir.glob("*/results.json")):
        new = new_dir / old.parent.name / "results.json"
        a, b = json.loads(old.read_text()), json.loads(new.read_text())
        na = {k: v for k, v in numbers(a.get("curves", {}), "curves").items()}
        nb = {k: v for k, v in numbers(b.get("curves", {}), "curves").items()}
        differ = max((abs(na[k] - nb[k]) for k in na.keys() & nb.keys()
                      if not (math.isnan(na[k]) and math.isnan(nb[k]))), default=float("nan"))
        keys = [k for k in a if k.startswith("test/") and k.endswith(("_mean", "_ci95")) or k.startswith("best_val")]
        shown = ", ".join(f"{k} {a[k]:.6g} -> {b.get(k, float('nan')):.6g}" for k in keys if k not in volatile)
        print(f"{old.parent.name}: {shown}; largest curve difference {differ:.3g}; "
              f"curve keys only in one: {len(na.keys() ^ nb.keys())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
