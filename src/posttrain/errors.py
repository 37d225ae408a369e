"""The one user-facing error type.

Anything the user can fix (a config value, a missing file) raises `PosttrainError` with a
one-paragraph message that names the offending key or file and says what would be valid.
Entry points catch it once and print the paragraph without a traceback; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class PosttrainError(Exception):
    """A problem with the user's input, explained in one paragraph."""

    status = "failed"  # what metrics.json records


class RunDiverged(PosttrainError):
    """Training blew up (NaN/inf, or a loss far above where it started): the settings, not
    the code, are at fault, and the run's numbers must not read as a result."""

    status = "diverged"


def is_number(value: object) -> bool:
    """A real number from a config: `true` is a bool (an int to Python), not 1."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def require(condition: bool, message: str) -> None:
    """Raise `PosttrainError(message)` unless `condition` holds."""
    if not condition:
        raise PosttrainError(message)


def require_positive(key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    """Check that a size/count config value is > 0, naming the key when it is not."""
    if value is None and allow_none:
        return
    require(
        is_number(value) and value > 0,
        f"Config key `{key}` must be a positive number, got {value!r}.",
    )


def require_bool(key: str, value: object) -> None:
    """Check a switch is a real boolean: Hydra keeps `no`/`off`/`1` as strings or ints, and a
    non-empty string is truthy, so `freeze_bn_stats=no` would switch the option on."""
    require(
        isinstance(value, bool),
        f"Config key `{key}` must be true or false, got {value!r}.",
    )


def require_count(key: str, value: object, minimum: int, *, allow_none: bool = False) -> None:
    """Check a count is a whole number >= `minimum` (not a bool, not `2.5`)."""
    if value is None and allow_none:
        return
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"Config key `{key}` must be a whole number >= {minimum}, got {value!r}.",
    )


def require_fraction(key: str, value: float) -> None:
    """Check that a split fraction lies in [0, 1)."""
    require(
        isinstance(value, int | float) and 0 <= value < 1,
        f"Config key `{key}` must be a fraction in [0, 1), got {value!r}.",
    )


def require_choice(key: str, value: object, choices: Iterable[object]) -> None:
    """Check that `value` is one of `choices`, listing them when it is not."""
    options = list(choices)
    require(
        value in options,
        f"Config key `{key}` is {value!r}; valid values: {', '.join(map(str, options))}.",
    )


def require_known_options(
    function: object, options: dict[str, object], key: str, supplied: Iterable[str] = ()
) -> None:
    """Check `options` against `function`'s keyword parameters before calling it.

    A typo such as `model.widht=64` then names the key and the valid spellings instead of
    surfacing as a TypeError from deep inside a constructor. A function that takes
    `**options` accepts any name here. `supplied`: parameters the caller passes itself
    (the method's `model`), which a config key would only be overwritten by, so not valid.
    """
    import inspect

    parameters = inspect.signature(function).parameters  # type: ignore[arg-type]
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # `**options`: the function checks (or passes on) what it takes itself
    accepted = [
        n for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL and n not in supplied
    ]
    unknown = sorted(set(options) - set(accepted))
    require(
        not unknown,
        f"Config key `{key}` has unknown option(s) {', '.join(unknown)}; "
        f"valid: {', '.join(accepted)}.",
    )


class SweepJobChanged(PosttrainError):
    """A re-run sweep asked a job folder that holds a finished job to hold another job (a key
    left out of folder names changed): the folder's results must stay those of its job, so
    nothing is recorded and the sweep stops."""

    status = "refused"


class FolderInUse(PosttrainError):
    """Another live process is writing the run folder (two runs started at once with one
    `hydra.run.dir`, a resume while the run still goes, a sweep re-run beside itself): the
    folder's record is that process's, so nothing is recorded and a sweep stops."""

    status = "refused"
