"""`python -m burstc <command>`: explain (what backend="burst" does to a model on G ranks)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"explain": "burstc.debug.explain"}
    if not argv or argv[0] not in commands:
        print("usage: python -m burstc explain module.path:factory --world-size G --seq-len N [--layout L]\n"
              "       (python -m burstc explain --help for details)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
