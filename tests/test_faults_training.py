"""Training under faults: full or read-only disks, a deleted run folder, damaged checkpoints,
signals, a second run on the same folder, deaths between renames, and a finished run resumed."""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import baichuan_qlora
from cnqlora.cli import run_command
from cnqlora.errors import UserError
from cnqlora.runs import atomic_dir, list_checkpoints, recover_atomic_dirs, run_lock

from test_training import command_line as argv, run, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def tmpfs(path, options):
    """A real small or read-only file system; root only (CI runs as root)."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder):
    """Write into `folder` until its file system is full."""
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


# --------------------------------------------------------------------------- disks


def test_a_read_only_output_folder_is_refused_before_the_model_loads(tiny_ner_model_dir, ner_data_dir, tmp_path,
                                                                     capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as out:
        code = run_command(baichuan_qlora.main, argv(tiny_ner_model_dir, ner_data_dir, out))
    captured = capsys.readouterr()
    assert code == 2
    assert "cannot write there (Read-only file system). Choose another --output_dir" in captured.err
    assert "Traceback" not in captured.err and "loaded" not in captured.out


def test_a_full_disk_stops_with_a_message_and_the_run_resumes_after(tiny_ner_model_dir, ner_data_dir, tmp_path,
                                                                    capsys):
    extra = ("--save_steps", "2")
    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a", *extra)
    with tmpfs(tmp_path / "small", "size=8m") as out:
        def fill_after_step_3(step, **_):
            if step == 3:
                fill(out)

        with pytest.raises(UserError, match="the disk is full while") as failure:
            run(tiny_ner_model_dir, ner_data_dir, out, *extra, callbacks=[fill_after_step_3])
        assert "--resume_from_checkpoint auto" in str(failure.value)
        # The checkpoint of step 2 is whole; the one that did not fit left nothing behind.
        assert [os.path.basename(p) for p in list_checkpoints(str(out / "run"))] == ["step-000002"]
        assert not [n for n in os.listdir(out / "run" / "checkpoints") if ".tmp-" in n]
        os.remove(out / "filler")
        resumed = run(tiny_ner_model_dir, ner_data_dir, out, *extra, "--resume_from_checkpoint", "auto")
        assert train_losses(resumed["history"]) == train_losses(full["history"])


def test_a_failed_checkpoint_write_leaves_no_partial_folder(tiny_ner_model_dir, ner_data_dir, tmp_path, monkeypatch):
    # The same failure without root: torch.save writes part of the file, then the disk is full.
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        if str(f).endswith("trainer_state.pt"):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(UserError, match="the disk is full while writing the checkpoint of step 3"):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path)
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


def test_a_run_folder_deleted_mid_run_is_a_message(tiny_ner_model_dir, ner_data_dir, tmp_path):
    def delete(step, **_):
        if step == 2:
            shutil.rmtree(tmp_path / "run")

    with pytest.raises(UserError, match="the run folder was deleted during the run"):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path, callbacks=[delete])


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.pt"])
def test_auto_skips_a_damaged_newest_checkpoint(tiny_ner_model_dir, ner_data_dir, tmp_path, damaged):
    extra = ("--save_steps", "2", "--save_total_limit", "3")
    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a", *extra)

    def crash(step, **_):
        if step == 5:
            raise KeyboardInterrupt  # dies without a word, like kill -9

    with pytest.raises(KeyboardInterrupt):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path / "b", *extra, callbacks=[crash])
    newest = list_checkpoints(str(tmp_path / "b" / "run"))[-1]
    assert newest.endswith("step-000004")
    path = os.path.join(newest, damaged)
    os.truncate(path, os.path.getsize(path) // 2)
    said = []
    resumed = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "b", *extra, "--resume_from_checkpoint", "auto",
                  log=said.append)
    assert any(f"warning: skipping checkpoint {newest}: {path}: damaged" in line for line in said), said
    assert any("at step 2" in line and line.startswith("resumed from") for line in said)
    assert train_losses(resumed["history"]) == train_losses(full["history"])


def test_an_explicit_damaged_checkpoint_is_refused(tiny_ner_model_dir, ner_data_dir, tmp_path):
    def crash(step, **_):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path, callbacks=[crash])
    checkpoint = list_checkpoints(str(tmp_path / "run"))[-1]
    with open(os.path.join(checkpoint, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00")
    with pytest.raises(UserError, match="damaged or missing.*Pass an older checkpoint, or auto"):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path, "--resume_from_checkpoint", checkpoint)


def test_auto_on_a_finished_run_trains_nothing(tiny_ner_model_dir, ner_data_dir, tmp_path):
    first = run(tiny_ner_model_dir, ner_data_dir, tmp_path)
    adapter = tmp_path / "run" / "adapter_model" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    said = []
    again = run(tiny_ner_model_dir, ner_data_dir, tmp_path, "--resume_from_checkpoint", "auto", log=said.append)
    assert any("finished before (adapter_model is written): nothing to train" in line for line in said)
    assert not any(line.startswith("loaded ") for line in said)  # no model was loaded
    assert adapter.stat().st_mtime_ns == written
    assert again["trained"] is False and again["steps"] == 6
    assert train_losses(again["history"]) == train_losses(first["history"])


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_exactly(tiny_ner_model_dir, ner_data_dir, tmp_path, capsys,
                                                                 name, code):
    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a")

    def preempt(step, **_):
        if step == 4:  # not a save_steps step: the checkpoint is the signal's own
            os.kill(os.getpid(), getattr(signal, name))

    options = argv(tiny_ner_model_dir, ner_data_dir, tmp_path / "b")
    from cnqlora.config import parse_options
    from cnqlora.training import TRAIN_SECTIONS, train

    # what was there before the run (a shell's background job inherits SIGINT ignored, for one)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert run_command(lambda a: train(*parse_options(TRAIN_SECTIONS, a), log=lambda _: None,
                                       callbacks=[preempt]), options) == code
    err = capsys.readouterr().err
    assert f"stopped: {name} at step 4 of 6: checkpoint written to" in err and "Traceback" not in err
    assert list_checkpoints(str(tmp_path / "b" / "run"))[-1].endswith("step-000004")
    assert not (tmp_path / "b" / "run" / "adapter_model").exists()
    # The handlers are put back once the run is over.
    assert {s: signal.getsignal(s) for s in before} == before
    resumed = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "b", "--resume_from_checkpoint", "auto")
    assert train_losses(resumed["history"]) == train_losses(full["history"])


# --------------------------------------------------------------------------- one run per folder


def test_a_second_run_on_the_same_folder_is_refused(tiny_ner_model_dir, ner_data_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from cnqlora.runs import run_lock
        with run_lock({str(tmp_path / "run")!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another training run is using this folder \(pid {holder.pid}\)"):
            run(tiny_ner_model_dir, ner_data_dir, tmp_path)
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
        assert run(tiny_ner_model_dir, ner_data_dir, tmp_path)["steps"] == 6
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with run_lock(str(tmp_path)):
        pass
    with run_lock(str(tmp_path)):  # not refused
        pass


# --------------------------------------------------------------------------- atomic folders


def _die_in_atomic_dir(dest, when):
    """A process that replaces `dest` with a folder holding 'new' and dies (os._exit) `when`."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from cnqlora.runs import atomic_dir
        real_rename = os.rename
        def rename_then_die(a, b):
            real_rename(a, b)
            os._exit(9)
        with atomic_dir({str(dest)!r}) as tmp:
            open(os.path.join(tmp, "content"), "w").write("new")
            if {when!r} == "writing":
                os._exit(9)
            os.rename = rename_then_die
        """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9


def _content(folder):
    with open(os.path.join(folder, "content")) as f:
        return f.read()


@pytest.mark.parametrize("when,expected", [("between_renames", "new"), ("writing", "old")])
def test_a_death_during_a_replacement_is_recovered_at_the_next_start(tmp_path, when, expected):
    dest = tmp_path / "adapter_model"
    with atomic_dir(str(dest)) as tmp:
        with open(os.path.join(tmp, "content"), "w") as f:
            f.write("old")
    _die_in_atomic_dir(dest, when)
    if when == "between_renames":
        assert not dest.exists()  # what the death left: neither folder in place
    said = []
    recover_atomic_dirs(str(tmp_path), said.append)
    assert _content(dest) == expected and said
    assert sorted(os.listdir(tmp_path)) == ["adapter_model"]


def test_a_training_start_cleans_what_a_dead_run_left(tiny_ner_model_dir, ner_data_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "run" / "checkpoints" / f"step-000003.tmp-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    said = []
    run(tiny_ner_model_dir, ner_data_dir, tmp_path, log=said.append)
    assert not stale.exists()
    assert any("left unfinished by an earlier process" in line for line in said)
