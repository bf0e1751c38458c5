"""Errors the user must fix, kept apart from bugs.

A :class:`UserError` is raised where input is validated (a config value, a file, a folder, a
checkpoint, a resumed run that no longer matches): the command line prints it as one line and
exits with code 2. Every other exception is a bug or an unexpected failure and keeps its full
traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from contextlib import contextmanager

#: Exit status of a run refused or stopped because of something the user gave.
USER_ERROR_EXIT = 2


class UserError(ValueError):
    """A mistake in what the user gave: reported as one line (``error: ...``), exit code 2.

    Examples:
        >>> raise UserError("bad_images='ignore' is not allowed: use 'error' or 'skip'.")  # doctest: +SKIP
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds nothing usable)."""


class BadImageError(UserError, OSError):
    """An image file that cannot be read (under ``bad_images: error``)."""


class CorruptCheckpointError(UserError):
    """A checkpoint or export that is truncated, fails its checksums or holds non-finite weights."""


class NoSpaceError(UserError, OSError):
    """The device ran out of space (or quota) while writing; what was there before is intact."""


class RunDirBusyError(UserError):
    """Another live process holds the run directory's lock."""


class ResumeMismatchError(UserError):
    """A checkpoint is resumed with a batch size, world size, accumulation or dataset that changed."""


def one_line(err: BaseException) -> str:
    """The user-facing line of ``err``.

    An error raised in a DataLoader worker reaches the main process re-wrapped with the worker's
    traceback in its message ("Caught X in DataLoader worker process 0. Original Traceback ...");
    its last line is the original message.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines())


def find_user_error(err: BaseException) -> UserError | None:
    """``err`` or the :class:`UserError` it was raised from (jsonargparse re-raises a constructor's
    error as a ValueError ``from`` it), else None."""
    for _ in range(16):
        if isinstance(err, UserError):
            return err
        if err.__cause__ is None:
            return None
        err = err.__cause__
    return None


@contextmanager
def user_errors():
    """Report a :class:`UserError` as ``error: <one line>`` on stderr and exit with code 2;
    anything else propagates with its traceback."""
    try:
        yield
    except Exception as err:
        user = find_user_error(err)
        if user is None:
            raise
        print(f"error: {one_line(user)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from err


# --- command-line parse errors ---------------------------------------------------------------
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^- Problem with given class_path '([^']+)':$")
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Expected a path but")


def parse_error_line(message: str) -> str:
    """One line from a jsonargparse error message: the full key, what was wrong, what is allowed.

    jsonargparse reports a bad value inside a subclass (``--model.mask_ratio high``) as a nested
    tree of every Union alternative it tried; the useful part is the innermost reason under the
    key path, e.g. ``--model.mask_ratio: expected float, got 'high'``.
    """
    keys, reasons, expected, given, class_path = [], [], [], None, None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ")
        if m := _KEY.match(line):
            keys.append(m.group(1))
            line = m.group(2)
        if m := _CLASS_PATH.match("- " + line):
            class_path = m.group(1)
        elif not line or line.startswith(_NOISE):
            continue
        elif line.startswith("Given value:"):
            given = given if given is not None else line.split(":", 1)[1].strip()
        elif m := re.match(r"Expected an? (.+?)(?:\. Got value: (.*))?$", line):
            expected.append((len(raw) - len(raw.lstrip()), _plain_type(m.group(1))))
            given = m.group(2) if m.group(2) is not None else given
        else:
            reasons.append(line)
    key = ".".join(keys)
    if m := re.match(r"Option '([^']+)' is not accepted", reasons[0] if reasons else ""):
        return _unknown_option(f"{key}.{m.group(1)}" if key else m.group(1), class_path)
    if reasons:  # a concrete failure beats the list of types that were tried
        reason = (f"{class_path}: " if class_path else "") + "; ".join(dict.fromkeys(reasons))
    else:
        reason = f"expected {_allowed(expected)}" + (f", got {given!r}" if given is not None else "")
    return f"--{key}: {reason}" if key else reason


def _allowed(expected: list[tuple[int, str]]) -> str:
    """The innermost alternatives (deepest indentation): ``int or null``."""
    depth = max((d for d, t in expected if t != "NoneType"), default=max((d for d, _ in expected), default=0))
    types = [t for d, t in expected if d == depth]
    return " or ".join(dict.fromkeys("null" if t == "NoneType" else t for t in types))


def _plain_type(text: str) -> str:
    """``<class 'float'>`` -> ``float``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    return re.sub(r"typing\.Literal\[(.*?)\]", r"one of \1", text)


def _unknown_option(key: str, class_path: str | None) -> str:
    """``--model.img_sz``: not an argument of the class; its arguments, closest first."""
    accepted = _init_arguments(class_path) if class_path else []
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    listed = f" {class_path} accepts: {', '.join(accepted)}." if accepted else ""
    return f"--{key} is not an option.{hint}{listed}"


def _init_arguments(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` (its own and those it passes on via ``**kwargs``)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters.values() if "__init__" in vars(klass) else []
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if "__init__" in vars(klass) and not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))
