"""``python -m metarun.evaluate`` is the ``metarun-eval`` command."""

from metarun.evaluate.command import main

main()
