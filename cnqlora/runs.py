"""A run folder on disk: one writer at a time, folders replaced atomically, checkpoints that are
checked before a run trusts them, and file-system failures turned into messages.

Training can die at any instant (kill -9, preemption, a full disk, a user deleting the folder).
What is on disk must then be either the old complete state or the new complete state, and the
next start must be able to tell which checkpoints are whole.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import UserError

LOCK_NAME = ".lock"


# --------------------------------------------------------------------------- atomic folders


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def atomic_dir(dest: str) -> Iterator[str]:
    """Yield a temporary folder that replaces `dest` only once everything in it is written.

    The temporary folder is `dest.tmp-PID`; on replacing, the old folder is first moved aside
    to `dest.old-PID`. A death between the two renames leaves both beside a missing `dest`,
    and `recover_atomic_dirs` then puts the new one in place: the old is only moved aside after
    the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{dest}.old-{os.getpid()}"
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover_atomic_dirs(folder: str, log: Callable[[str], None] = print) -> None:
    """Finish or undo the replacements that dead processes left in `folder` (not recursive).

    - `X.tmp-PID` with `X.old-PID` and no `X`: died between the renames; the tmp is complete -> X.
    - `X.tmp-PID` otherwise: died while writing it -> removed.
    - `X.old-PID` with X in place: died before removing it -> removed; with no X: restored.
    Folders of a live process are left alone (the run lock makes that another command's folder).
    """
    if not os.path.isdir(folder):
        return
    names = sorted(os.listdir(folder))
    # Every tmp first: a tmp completed between the renames must win over restoring its old.
    for kind in ("tmp", "old"):
        for name in names:
            base, sep, pid = name.rpartition(f".{kind}-")
            if not sep or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            path, dest = os.path.join(folder, name), os.path.join(folder, base)
            if not os.path.exists(path):  # handled with its partner
                continue
            old, tmp = f"{dest}.old-{pid}", f"{dest}.tmp-{pid}"
            if kind == "tmp" and os.path.exists(old) and not os.path.exists(dest):
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
                log(f"{dest}: completed the replacement that an earlier process (pid {pid}) died in")
            elif kind == "old" and not os.path.exists(dest):
                os.rename(old, dest)
                log(f"{dest}: restored the copy that an earlier process (pid {pid}) had moved aside")
            else:
                shutil.rmtree(path, ignore_errors=True)
                log(f"{path}: removed, left unfinished by an earlier process (pid {pid})")


# --------------------------------------------------------------------------- the run lock


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold `<run_dir>/.lock` for the whole run; a second run on the same folder is refused.

    An flock is released by the kernel when its process dies, so a run killed with -9 leaves
    no stale lock behind.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    handle = open(path, "a+", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # Windows: run unlocked rather than not at all
        try:
            yield
        finally:
            handle.close()
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir}: another training run is using this folder ({holder}). Wait for it to "
                            "finish, stop it, or give this run another --run_name.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


# --------------------------------------------------------------------------- file-system faults


def check_writable(folder: str) -> None:
    """Fail now, before a model is loaded, if `folder` cannot be created or written."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror}). Choose another --output_dir, or make the "
                        "folder writable.") from None


def describe_os_error(e: OSError, run_dir: str, what: str) -> UserError:
    """One message for a file-system failure in the middle of a run: what failed and what is safe."""
    where = e.filename or run_dir
    resume = "free some space, then continue with --resume_from_checkpoint auto"
    full = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "disk quota exceeded"}.get(e.errno)
    if full:
        return UserError(f"{where}: {full} while {what}. The newest complete checkpoint is kept; {resume}.")
    # The lock file goes with the folder; a writer that recreated the folder since does not bring it back.
    if not os.path.isfile(os.path.join(run_dir, LOCK_NAME)):
        return UserError(f"{run_dir}: the run folder was deleted during the run (while {what}); nothing more can "
                         "be saved there. Start the run again.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"{where}: cannot write there ({e.strerror}) while {what}. Make the folder writable, "
                         "then continue with --resume_from_checkpoint auto.")
    return UserError(f"{where}: {e.strerror or e} while {what}.")


# --------------------------------------------------------------------------- checkpoints


STATE_NAME = "trainer_state.pt"
WEIGHTS_NAME = "adapter_model.safetensors"


def list_checkpoints(run_dir: str) -> list[str]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [d for d in os.listdir(folder) if d.startswith("step-") and d[5:].isdigit()
             and os.path.isfile(os.path.join(folder, d, STATE_NAME))]
    return [os.path.join(folder, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter weights, trainer state) of a checkpoint folder; UserError if either is damaged."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = os.path.join(path, WEIGHTS_NAME)
    state_path = os.path.join(path, STATE_NAME)
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path}: damaged or missing ({e})") from None
    try:
        state = torch.load(state_path, weights_only=True)
    except Exception as e:  # noqa: BLE001  a truncated zip or pickle fails in many ways
        raise UserError(f"{state_path}: damaged ({type(e).__name__}: {e})") from None
    missing = {"step", "optimizer", "scheduler", "rng", "history"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise UserError(f"{state_path}: damaged (no {', '.join(sorted(missing))})")
    return weights, state


def find_resume_point(spec: str, run_dir: str,
                      log: Callable[[str], None] = print) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """The checkpoint to resume from and its contents, read and checked; None: start from scratch.

    With `auto`, a damaged newest checkpoint (a crash while the disk filled up, a copy cut short)
    is skipped for the newest one that reads back whole; an explicit folder must be whole.
    """
    if spec == "auto":
        for path in reversed(list_checkpoints(run_dir)):
            try:
                return (path, *read_checkpoint(path))
            except UserError as e:
                log(f"warning: skipping checkpoint {path}: {e}; trying the one before it")
        return None
    if not os.path.isfile(os.path.join(spec, STATE_NAME)):
        raise UserError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {STATE_NAME}). "
                        f"Checkpoints of this run: {', '.join(list_checkpoints(run_dir)) or 'none'}.")
    try:
        return (spec, *read_checkpoint(spec))
    except UserError as e:
        raise UserError(f"--resume_from_checkpoint {spec}: {e}. Pass an older checkpoint, or auto to take the "
                        "newest whole one.") from None
