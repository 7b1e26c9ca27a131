"""The command line as a card, a report or ``pretrain.json`` records it: folders named so that the record means the
same on another machine, never the absolute (often temporary) paths of the machine that wrote it."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path


def portable_path(path: str | Path, cwd: str | Path | None = None) -> str:
    """``path`` as a shared record names it: unchanged when relative; relative to the working directory when beneath
    it (what the user would type there); otherwise the folder's name alone, so that the folders of one record (demos,
    output) read as siblings of the folder the commands run from.

    >>> portable_path("/tmp/run/report", cwd="/tmp/run"), portable_path("/tmp/demos", cwd="/work")
    ('report', 'demos')
    """
    text = str(path)
    if not os.path.isabs(text):
        return text
    here = Path(cwd) if cwd is not None else Path.cwd()
    target = Path(os.path.normpath(text))
    if target.is_relative_to(here):
        return target.relative_to(here).as_posix()
    return target.name or "."


def portable_argument(arg: str, cwd: str | Path | None = None) -> str:
    """One argument with its path made portable: a path itself, ``--option=PATH`` or ``key=PATH`` (a recipe override
    such as ``output_dir=/tmp/run``, an eval ``--adapter name=/tmp/adapter``)."""
    if os.path.isabs(arg):
        return portable_path(arg, cwd)
    key, sep, value = arg.partition("=")
    if sep and os.path.isabs(value):
        return f"{key}={portable_path(value, cwd)}"
    return arg


def portable_command(program: str, argv: Sequence[str], cwd: str | Path | None = None) -> str:
    """``program`` followed by ``argv`` quoted for a shell, each absolute path written by :func:`portable_path`.

    >>> portable_command("python -m rvla_peft.eval", ["--adapter", "a=/tmp/x/adapter", "--out", "/tmp/x/report"])
    'python -m rvla_peft.eval --adapter a=adapter --out report'
    """
    return " ".join([program, *(shlex.quote(portable_argument(a, cwd)) for a in argv)]).rstrip()


def portable_command_line(command: str, cwd: str | Path | None = None) -> str:
    """A command already written as one line (``--demos-command``, an older record) with its paths made portable."""
    return shlex.join(portable_argument(word, cwd) for word in shlex.split(command))
