"""Count the bad-input test cases and how many of them assert exactly one line (docs/results.md, issue 21).

A collected test item (each parametrized case counts once) is a bad-input case when its test function expects
exit status 2, SystemExit or a ``metarun: error:`` line (or uses conftest's ``one_line_error``); it asserts one
line when it uses ``one_line_error`` or checks ``len(lines) == 1`` / ``splitlines() == [...]``. A heuristic on
the tests' source, so the numbers are a count, not a proof.

    python scripts/count_bad_inputs.py tests/test_reliability.py tests/test_cli.py tests/test_run_dir.py \\
        tests/test_evaluate.py tests/test_table.py tests/test_sweeps.py tests/test_distributed.py
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

BAD = re.compile(r"one_line_error|returncode == 2|code == 2|raises\(SystemExit|metarun: error")
ONE = re.compile(r"one_line_error|len\(lines\) == 1|splitlines\(\) == \[")


def main() -> None:
    files = sys.argv[1:]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-m", "",
                                *files], capture_output=True, text=True).stdout
    items = [line for line in collected.splitlines() if "::" in line]
    bodies = {}
    for name in files:
        source = Path(name).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                bodies[(name, node.name)] = ast.get_source_segment(source, node) or ""
    counts = {name: [0, 0, 0] for name in files}
    for item in items:
        name, rest = item.split("::", 1)
        body = bodies.get((name, rest.split("[")[0]), "")
        counts[name][0] += 1
        if BAD.search(body):
            counts[name][1] += 1
            counts[name][2] += bool(ONE.search(body))
    print(f"{'file':30s} {'items':>6s} {'bad-input':>9s} {'one-line':>8s}")
    for name, (total, bad, one) in counts.items():
        print(f"{name:30s} {total:6d} {bad:9d} {one:8d}")
    print(f"{'all':30s} {sum(c[0] for c in counts.values()):6d} {sum(c[1] for c in counts.values()):9d} "
          f"{sum(c[2] for c in counts.values()):8d}")


if __name__ == "__main__":
    main()
