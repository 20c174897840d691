"""The `aligna` command and `python -m aligna`: the CLI (`aligna.cli`), entered so that Ctrl-C
while torch loads is a clean "interrupted" (exit status 130), not a traceback."""

import sys


def main() -> int:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        print("aligna: interrupted", file=sys.stderr)
        return 130
    return cli()


if __name__ == "__main__":
    raise SystemExit(main())
