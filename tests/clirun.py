"""Run `upstack ARGS -q` in this process (cheaper than a new interpreter) and keep what it told the user."""
import contextlib
import io

from upstack.cli import main


def cli(*args) -> tuple[int, str]:
    """`upstack ARGS -q` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(args[0]), "-q", *map(str, args[1:])])
    return rc, err.getvalue()
