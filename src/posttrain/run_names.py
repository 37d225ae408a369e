"""Run folder names that two runs started in the same second never share.

Hydra names run and sweep folders by the second they start (`${now:...}`), so two runs
started together wrote into one folder, the second overwriting the first's metrics and
checkpoints. `${run_id:}` adds a suffix unique to the process (its pid, plus a random byte
for processes on different machines sharing a filesystem), fixed for the process's life so
every interpolation of the folder agrees. A sweep job's folder is named after its overrides
by `${job_folder:...}`, which keeps that name one folder that the file system accepts.
Standard library and OmegaConf only: `--help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
from pathlib import Path

from omegaconf import OmegaConf

RUN_ID = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(1)}"


def register_resolvers() -> None:
    """The resolvers `conf/hydra` uses: `${run_id:}` and `${job_folder:...}` in `default.yaml`,
    `${device_count:...}` and `${gpu_count:...}` in `launcher/slurm.yaml`; safe to call more
    than once."""
    from posttrain.slurm import device_count, gpu_count

    for name, resolver in (
        ("run_id", lambda: RUN_ID),
        ("job_folder", job_folder),
        ("device_count", device_count),
        ("gpu_count", gpu_count),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS, NTFS's 255 UTF-16 units)
HASH_CHARS = 10


def job_folder(number: int | str, overrides: str) -> str:
    """`<number>_<overrides>` as the name of one folder inside the sweep folder.

    Hydra's `override_dirname` is the overrides as typed: a `/` in a value
    (`optimized_metric=val/loss`, `method.teacher=<run>/best.ckpt`) made nested folders, and
    a long sweep (a few regularizer knobs) a name over the file system's 255 bytes, which
    stopped the sweep with `OSError: File name too long`. A `/` reads `%2F`; a name over
    `NAME_MAX` bytes keeps its start and ends in a hash of the whole name, so it is still
    readable, the same for the same job (a re-run sweep finds it) and another for another.
    """
    name = f"{number}_{overrides}".replace("/", "%2F")
    encoded = name.encode()
    if len(encoded) <= NAME_MAX:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:HASH_CHARS]
    head = encoded[: NAME_MAX - HASH_CHARS - 1].decode(errors="ignore")  # whole characters
    return f"{head}~{digest}"


def override_value(path: Path | str) -> str:
    """`path` as one Hydra override value that can be pasted on a command line.

    Sweep job folders are named `<num>_<key>=<value>,...`: unquoted, Hydra's override parser
    rejects such a path (`mismatched input '='`). Plain paths stay as they are.
    """
    text = str(path)
    if all(char.isalnum() or char in "/._-+~" for char in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shell_override(key: str, path: Path | str) -> str:
    """`key=path` as one shell word for a printed command: what Hydra must receive quoted
    (a sweep job's folder) is wrapped again for the shell, which strips one level."""
    argument = f"{key}={override_value(path)}"
    if argument == f"{key}={path}":
        return argument
    if not any(char in argument for char in '"$`\\!'):
        return f'"{argument}"'
    return shlex.quote(argument)


FOLDER_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir", "paths.root_dir")


def unwritable_folder(path: Path) -> Path | None:
    """The first existing ancestor of `path` if it cannot hold a new folder, else None.

    Permission bits alone said yes to root for /proc, where mkdir then failed inside Hydra
    with a traceback: a folder is made and removed there to be sure.
    """
    for candidate in (path, *path.parents):
        if candidate.exists():
            usable = candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
            return None if usable and can_make_folder_in(candidate) else candidate
    return None


def can_make_folder_in(folder: Path) -> bool:
    """True when a folder can really be created (and is removed again) inside `folder`."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".posttrain-probe-", dir=folder))
    except OSError:
        return False
    return True


def check_output_folders(argv: list[str]) -> str | None:
    """A paragraph if a run folder given on the command line cannot be created.

    Hydra creates the folder before any posttrain code runs, and reports a failure as a
    traceback with exit status 1; checked here, before Hydra, it is one paragraph.
    """
    given = dict(arg.split("=", 1) for arg in argv if arg.split("=", 1)[0] in FOLDER_KEYS)
    folders = {key: value for key, value in given.items() if "${" not in value}
    if not folders:
        folders = {"the current folder (runs go to ./outputs)": "."}
    for key, value in folders.items():
        blocked = unwritable_folder(Path(value).expanduser())
        if blocked is not None:
            what = "is not a folder" if not blocked.is_dir() else "is not writable"
            return (
                f"Config key `{key}`: the run folder {value} cannot be created, because "
                f"{blocked} {what}. Choose a writable place, e.g. `{key}=/tmp/posttrain-run`."
            )
    return None


def refuse_unwritable_output(argv: list[str]) -> None:
    """Exit with status 2 and one paragraph if the run folder cannot be created."""
    import sys

    problem = check_output_folders(argv)
    if problem is not None:
        print(f"\nposttrain: error: {problem}\n", file=sys.stderr)
        raise SystemExit(2)
