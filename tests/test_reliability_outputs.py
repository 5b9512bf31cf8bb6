"""Folders, swaps and links (issue 22, items 1, 2, 4 and 15's symlinked run folder).

A run replaces only what a run made; a kill in the middle of `--overwrite`'s two renames keeps a complete
copy that the next writer restores; a symbolic link planted where upstack writes (a lock, a run folder's
files) is refused in one line and its target left as it was; a run folder given through a link takes the
lock of its real path."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clirun import cli
from tiny import build_tiny_model

from upstack.pipeline import MARKER

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def recipe(tmp_path, model_dir, name=None, second="merged"):
    """A two-stage recipe: `first` upscales the model, `second` upscales `first`."""
    p = tmp_path / "r.yaml"
    head = f"name: {name}\n" if name is not None else ""
    p.write_text(head + f"stages:\n  first:\n    type: upscale\n    source: {model_dir}\n    m: 1\n"
                        f"  {second}:\n    type: upscale\n    source: first\n    m: 1\n")
    return p


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder` (links as 'link -> target')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


# ------------------------------------------------------------------------------------------------
# Item 1: a run replaces only what a run made

def test_run_refuses_a_stage_folder_it_did_not_make_before_any_stage_runs(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "merged" / "data.txt").write_text("three years of work\n")
    rc, err = cli("run", recipe(tmp_path, model_dir), "--out", run_dir)
    line = one_error_line(err)
    assert rc == 2 and str(run_dir / "merged") in line and "was not made by upstack run" in line, err
    assert (run_dir / "merged" / "data.txt").read_text() == "three years of work\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["merged"]   # no stage ran, nothing written


def test_run_refuses_to_overwrite_run_files_it_did_not_write(model_dir, tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    mine = {"recipe.yaml": "my recipe\n", "report.md": "# my report\n", "results.json": '{"mine": 1}\n'}
    for name, text in mine.items():
        (run_dir / name).write_text(text)
    rc, err = cli("run", recipe(tmp_path, model_dir), "--out", run_dir)
    line = one_error_line(err)
    assert rc == 2 and "was not written by upstack run" in line and str(run_dir) in line, err
    assert {p.name: p.read_text() for p in run_dir.iterdir()} == mine


@pytest.mark.parametrize("name", ["ABSOLUTE", "../../../victim3", "sub/dir", "..", "12", "[a, b]", "{a: 1}"])
def test_recipe_name_is_a_name_not_a_path(model_dir, tmp_path, monkeypatch, name):
    victim = tmp_path / "victim3"
    (victim / "important").mkdir(parents=True)
    (victim / "important" / "thesis.txt").write_text("chapter 1\n")
    if name == "ABSOLUTE":
        name = str(victim)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # the default run folder is runs/<name>: ../../../victim3 is tmp_path/victim3
    p = recipe(tmp_path, model_dir, name=name, second="important")
    rc, err = cli("run", p)
    line = one_error_line(err)
    assert rc == 2 and str(p) in line and "line 1" in line and "name" in line, err
    assert tree(victim) == {"important/thesis.txt": b"chapter 1\n"}
    assert not (work / "runs").exists()


def test_a_run_still_replaces_what_a_run_made(model_dir, tmp_path):
    """What a run made stays replaceable: a stage folder whose marker is gone (a kill between the output's
    rename and the marker's write) is known from the run folder's record; an older run folder (no record)
    from its stage markers."""
    p = recipe(tmp_path, model_dir)
    run_dir = tmp_path / "run"
    assert cli("run", p, "--out", run_dir)[0] == 0
    (run_dir / "merged" / MARKER).unlink()
    rc, err = cli("run", p, "--out", run_dir)
    assert rc == 0 and (run_dir / "merged" / MARKER).is_file(), err
    (run_dir / ".upstack_run.json").unlink()                          # a run folder of an older upstack
    p.write_text(p.read_text().replace("source: first\n    m: 1", "source: first\n    m: 0"))
    rc, err = cli("run", p, "--out", run_dir)
    assert rc == 0, err
    assert json.loads((run_dir / "merged" / MARKER).read_text())["config"]["m"] == 0


# ------------------------------------------------------------------------------------------------
# Item 2: a kill between the two renames of --overwrite

# Write OUT (a folder with one file) with atomic_output_dir; with "kill-at-swap", replace it with --overwrite
# and SIGKILL this process at the second rename of the swap (old moved aside, the new copy not yet in place);
# with "kill-in-delete", at the removal of the old copy after the swap, half of it deleted.
_SWAP = """
import os, shutil, signal, sys
from pathlib import Path
import upstack.outputs as outputs
out, text, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real_rename, real_rmtree = os.rename, shutil.rmtree

def rename(src, dst, **k):
    if how == "kill-at-swap" and Path(dst) == out and Path(src).name.startswith(f".{out.name}.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, **k)

def rmtree(path, *a, **k):
    if how == "kill-in-delete" and Path(path).name.startswith(f".{out.name}."):
        os.unlink(sorted(Path(path).iterdir())[0])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)

os.rename, shutil.rmtree = rename, rmtree
with outputs.atomic_output_dir(out, overwrite=how != "none") as tmp:
    (tmp / "a.txt").write_text(text)
    (tmp / "b.txt").write_text(text)
"""


def write_out(out, text, how="none"):
    return subprocess.run([sys.executable, "-c", _SWAP, str(out), text, how], capture_output=True, text=True,
                          timeout=120)


def siblings(out):
    """OUT's temporary siblings (its lock, which a killed writer leaves, aside)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.suffix != ".lock")


def test_a_kill_between_the_two_renames_of_overwrite_keeps_the_old_copy(model_dir, tmp_path, caplog):
    from upstack.errors import OutputExistsError
    from upstack.outputs import atomic_output_dir

    out = tmp_path / "out"
    assert write_out(out, "first").returncode == 0
    killed = write_out(out, "second", "kill-at-swap")
    assert killed.returncode == -9, killed.stderr
    left = siblings(out)                                  # .out.old-PID-* and .out.tmp-PID-*: both complete
    assert not out.exists() and len(left) == 2 and ".out.old-" in left[0], left
    with pytest.raises(OutputExistsError), atomic_output_dir(out):   # the next writer restores, then refuses
        pass
    assert tree(out) == {"a.txt": b"first", "b.txt": b"first"} and siblings(out) == []
    assert [r.message for r in caplog.records if "restored" in r.message and left[0] in r.message]
    # a CLI writer likewise, and --overwrite then replaces it as usual
    assert write_out(out, "second", "kill-at-swap").returncode == -9
    rc, err = cli("upscale", model_dir, out, "--m", 1)
    assert rc == 2 and "already exists" in err and tree(out) == {"a.txt": b"first", "b.txt": b"first"}
    assert write_out(out, "third", "kill-at-swap").returncode == -9
    assert write_out(out, "fourth", "overwrite").returncode == 0
    assert tree(out) == {"a.txt": b"fourth", "b.txt": b"fourth"} and siblings(out) == []


def test_a_half_deleted_old_copy_is_never_restored(tmp_path):
    """After the swap the old copy is renamed to a temporary name before it is deleted: a kill mid-delete
    leaves nothing the next writer would take for a complete copy (even when OUT was removed since)."""
    from upstack.outputs import atomic_output_dir

    out = tmp_path / "out"
    assert write_out(out, "first").returncode == 0
    killed = write_out(out, "second", "kill-in-delete")
    assert killed.returncode == -9, killed.stderr
    assert tree(out) == {"a.txt": b"second", "b.txt": b"second"} and len(siblings(out)) == 1
    for f in out.iterdir():
        f.unlink()
    out.rmdir()                                   # the user removed OUT before the next writer came
    with atomic_output_dir(out) as tmp:
        (tmp / "c.txt").write_text("new")
    assert tree(out) == {"c.txt": b"new"} and siblings(out) == []


# ------------------------------------------------------------------------------------------------
# Item 4: writes do not follow planted links

def test_a_link_at_the_lock_path_is_refused_and_its_target_untouched(model_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "up"
    (tmp_path / ".up.lock").symlink_to(victim)
    rc, err = cli("upscale", model_dir, out, "--m", 1)
    line = one_error_line(err)
    assert rc == 2 and ".up.lock" in line and "symbolic link" in line, err
    assert victim.read_text() == "precious\n" and not out.exists()
    # a hard link to another file is refused likewise (writing the PID would write into that file)
    (tmp_path / ".up.lock").unlink()
    os.link(victim, tmp_path / ".up.lock")
    rc, err = cli("upscale", model_dir, out, "--m", 1)
    assert rc == 2 and ".up.lock" in one_error_line(err) and victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["recipe.yaml", "report.md", "results.json"])
def test_a_run_folder_file_linked_elsewhere_is_refused(model_dir, tmp_path, name):
    p = recipe(tmp_path, model_dir)
    run_dir = tmp_path / "run"
    assert cli("run", p, "--out", run_dir)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(victim)
    p.write_text(p.read_text().replace("source: first\n    m: 1", "source: first\n    m: 0"))
    rc, err = cli("run", p, "--out", run_dir)
    line = one_error_line(err)
    assert rc == 2 and str(run_dir / name) in line and "symbolic link" in line, err
    assert victim.read_text() == "precious\n"
    assert json.loads((run_dir / "merged" / MARKER).read_text())["config"]["m"] == 1   # no stage ran


def test_report_does_not_write_through_a_link(model_dir, tmp_path):
    p = recipe(tmp_path, model_dir)
    run_dir = tmp_path / "run"
    assert cli("run", p, "--out", run_dir)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / "report.md").unlink()
    (run_dir / "report.md").symlink_to(victim)
    rc, err = cli("report", run_dir)
    assert rc == 2 and "symbolic link" in one_error_line(err) and victim.read_text() == "precious\n"


@pytest.mark.parametrize("resume_step", [None, 3])
def test_the_training_metrics_log_is_not_written_through_a_link(tmp_path, resume_step):
    from upstack.errors import UpstackError
    from upstack.train.metrics import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text('{"step": 9}\n')
    work = tmp_path / "out.work"
    work.mkdir()
    (work / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UpstackError, match="metrics.jsonl is a symbolic link"):
        MetricsLog(work, True, False, resume_step)
    assert victim.read_text() == '{"step": 9}\n'


# ------------------------------------------------------------------------------------------------
# Item 15 (part): a run folder given through a link takes the lock of its real path

_HOLD = """
import os, sys, time
from upstack.outputs import output_lock
with output_lock(sys.argv[1], "run"):
    open(sys.argv[2] + ".ready", "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""


def test_a_run_folder_through_a_link_takes_the_lock_of_its_real_path(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    flag = tmp_path / "flag"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(flag)])
    try:
        deadline = time.time() + 60
        while not Path(str(flag) + ".ready").exists():
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.05)
        rc, err = cli("run", recipe(tmp_path, model_dir), "--out", link)
        line = one_error_line(err)
        assert rc == 2 and f"is being run by process {holder.pid}" in line, err
        assert list(run_dir.iterdir()) == []
    finally:
        flag.touch()
        holder.wait(timeout=60)
