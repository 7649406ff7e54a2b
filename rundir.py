"""The folder a script writes into, and the rules every writer of this project follows for it: the
trainers (through runs.py), `sample.py generate` / `explore` and `train_reward.py`.

- **Checked** before anything is made (`check_writable`): not '', not a file, not under a file or a
  dangling symlink, writable.
- **Held** (`hold`): one process at a time holds a folder, by an exclusive lock on FOLDER/.lock taken
  before any model loads and kept until the process ends; a second writer is refused in one line naming
  the holder; a lock left by a killed process is taken over, with a note.
- **One result per folder** (`occupant`): what a folder holds is told by the files that say so: a
  training run (run.json, args.json, log.jsonl, checkpoints/, ...), a result (.result.json, written by
  `claim`: sample.py's, train_reward.py's), or files this project did not write. A writer refuses a folder
  that holds anything else than its own kind, and replaces its own kind only when told to (--overwrite;
  a trainer also continues its own run, --resume). Files a writer did not make are never deleted.
- A training run's **plan** (`plan_run`: new, overwrite, restart or resume, decided before anything is
  held or loaded), its **log** (`RunLog`), its **checkpoints** (each records the trainer that wrote it
  and a fingerprint of the base model, which --resume checks) and its per-epoch **sample grid**.
- **Ctrl-C** (`on_ctrl_c`): one line saying where it stopped, never a traceback.

Light on purpose (no torch at import): a script imports it first, so that Ctrl-C while the rest imports
already ends in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line, no traceback.


def on_ctrl_c(line: Callable[[], str]):
    """From now on, a Ctrl-C that ends this process prints `line()` on stderr instead of a traceback (the
    process still ends as interrupted: exit status 130 in a shell, and at-exit clean-up such as releasing a
    held folder runs). Called at the top of each script, before its heavy imports, and again by whatever
    then knows better what an interruption leaves (a run: its epoch and checkpoint; generate: its images).
    Other exceptions keep Python's report."""
    previous = getattr(sys.excepthook, "delegate", sys.excepthook)  # replace our own hook, not chain it

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(line(), file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook.delegate = previous
    sys.excepthook = hook


# ---------------------------------------------------------------------------------------------
# The folder: writable, held by one process.


def check_writable(out: str | Path, flag: str):
    """ValueError (one line naming `flag`) when `out` cannot be the folder a writer makes and writes: empty,
    a file, under a file or a dangling symlink (mkdir would fail once the work is done), or in a folder this
    user cannot write."""
    if str(out).strip() == "":
        raise ValueError(f"{flag} '': give a directory (an empty path would write into the current folder)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} '{out}' is a file: give a directory")
    chain = (out.absolute(), *out.absolute().parents)
    dangling = next((p for p in chain if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise ValueError(
            f"{flag} '{out}': '{dangling}' is a symlink to '{os.readlink(dangling)}', which does not exist, so the "
            f"directory cannot be made: create the link's target or choose another {flag}"
        )
    existing = next(p for p in chain if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"{flag} '{out}': '{existing}' is a file, so the directory cannot be made: choose another {flag}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} '{out}': cannot write in '{existing}' (permission denied): choose another {flag}")


class Held:
    """This process's hold on a folder: an exclusive flock on FOLDER/.lock (the kernel drops it when the
    process dies, however it dies), and .lock's content saying who holds it. `release()` (also run at
    exit) deletes .lock, an unfinished result's mark when nothing else of it was written, and the folder
    when this hold created it and nothing is left in it: a writer that never got going leaves nothing."""

    def __init__(self, path: Path, fd: int, created: bool, notes: list[str]):
        self.path, self.fd, self.created, self.notes = path, fd, created, notes
        self.mark: Path | None = None  # .result.json this hold wrote (claim), until the result is finished
        atexit.register(self.release)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc):
        self.release()  # however the block ends: an error in it leaves no held folder behind

    def release(self):
        if self.fd is None:
            return
        if self.mark is not None and {p.name for p in self.path.iterdir()} == {RESULT_MARK, ".lock"}:
            self.mark.unlink()  # an unfinished result that wrote nothing (it failed while loading): no trace of it
        with contextlib.suppress(OSError):
            (self.path / ".lock").unlink()
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty


def hold(out: str | Path, owner: str, flag: str = "--output-dir") -> Held:
    """Hold `out` for this process (creating it if needed). ValueError in one line naming the holder when
    another live process holds it; a .lock whose process no longer holds it (killed) is taken over, said in
    the returned Held's notes."""
    import fcntl

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(path)
            os.close(fd)
            raise ValueError(
                f"{flag} {out} is in use by process {holder.get('pid', '?')} ({holder.get('owner', 'another process')}, "
                f"started {holder.get('started', '?')}): wait for it to finish, or choose another {flag}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a .lock file its previous holder deleted between our open and our lock
            break
        os.close(fd)
    notes = []
    stale = _read_json(path)
    if stale.get("pid") and stale.get("pid") != os.getpid():
        # The lock is free, so its process ended (or let go) without deleting the file; the number may since
        # belong to an unrelated live process, so "not running" would be a guess: say what is known.
        notes.append(
            f"note: {out} was left locked by process {stale['pid']} ({stale.get('owner', '?')}, started "
            f"{stale.get('started', '?')}), which no longer holds it (it was killed): taken over"
        )
    info = {"pid": os.getpid(), "owner": owner, "started": _now(), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return Held(out, fd, created, notes)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# ---------------------------------------------------------------------------------------------
# One result per folder.

RUN_OUTPUTS = ("checkpoints", "log.jsonl", "eval", "images", "gallery.html", "plots")  # what a run computed or derived
ARGS_FILES = ("run.json", "args.json", "args.jsonl")  # a run's identity and argument history
RESULT_MARK = ".result.json"  # what a result's writer (claim) wrote into the folder it owns
RESULT_NAMES = {"train_reward.py": "a trained reward model"}  # else "a KIND result"
TRAINER_NAMES = {"ddpo": "a DDPO run (train_ddpo.py)", "alignprop": "an AlignProp run (train_alignprop.py)"}
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1", "unknown": "an unidentified model"}


def occupant(out: str | Path, keep: tuple[str, ...] = ()) -> dict | None:
    """What `out` holds, read from the files that say so (nothing is loaded): None when it is absent or
    empty (.lock and the `keep` entries aside); {'kind': 'run', 'trainer', 'family'} for a training run
    (trainer None when nothing says which); {'kind': 'result', 'by', 'time', 'complete'} for a result;
    {'kind': 'files', 'names'} for files no writer of this project made."""
    out = Path(out)
    if not out.is_dir():
        return None
    names = sorted(p.name for p in out.iterdir() if p.name != ".lock" and p.name not in keep)
    if RESULT_MARK in names:  # first: a result may hold images/ too (sample.py explore --save-images)
        mark = _read_json(out / RESULT_MARK)
        complete = mark.get("complete", True)  # a mark from before 'complete' existed: a finished result
        return {
            "kind": "result",
            "by": mark.get("kind", "sample.py"),
            "time": mark.get("time", "?"),
            "complete": complete,
        }
    if any(n in names for n in ARGS_FILES + RUN_OUTPUTS[:4]):
        return {"kind": "run", **(run_identity(out) or {"trainer": None, "family": None})}
    if "config.json" in names or "model.safetensors" in names:  # a reward model from before the mark
        return {"kind": "result", "by": "train_reward.py", "time": None, "complete": True}
    return {"kind": "files", "names": names} if names else None


def run_identity(out: Path) -> dict | None:
    """{'trainer', 'family'} of the run in `out`: its run.json, or for a run written before run.json
    existed, the trainer told by its args.json (DDPO has --train-batch-size, AlignProp --backprop-steps)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "run.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((out / "args.json").read_text())
        trainer = "ddpo" if "train_batch_size" in old else "alignprop" if "backprop_steps" in old else None
        return {"trainer": trainer, "family": None} if trainer else None
    return None


def _result_name(by: str) -> str:
    return RESULT_NAMES.get(by, f"a {by} result")


def check_result_dir(out: str | Path, by: str, overwrite: bool, flag: str, keep: tuple[str, ...] = ()):
    """Read-only: ValueError (one line) unless `out` may take a result of `by` (e.g. 'sample.py generate'):
    it must be absent, empty, or hold a result of the same script (replaced only with --overwrite), never a
    training run, another script's result or files this project did not write (`keep`: entries the writer
    itself keeps beside its result, e.g. train_reward.py's data/ cache)."""
    found = occupant(out, keep)
    if found is None:
        return
    if found["kind"] == "run":
        raise ValueError(f"{flag} {out} holds a training run: choose another {flag} (a run's directory is its own)")
    if found["kind"] == "files":
        names = found["names"]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"{flag} {out} holds files that {by.split()[0]} did not write ({shown}): choose an empty or new {flag}"
        )
    same_script = found["by"].split()[0] == by.split()[0]
    if not same_script:
        raise ValueError(f"{flag} {out} holds {_result_name(found['by'])}: choose another {flag}")
    if overwrite:
        return
    if not found["complete"]:
        only_mark = occupant(out, keep + (RESULT_MARK,)) is None
        if only_mark:  # a writer killed while loading: nothing of it to lose
            return
        raise ValueError(
            f"{flag} {out} holds an unfinished {found['by']} result (started {found['time']}; interrupted or failed): "
            f"pass --overwrite to replace it, or choose another {flag}"
        )
    written = f" (written {found['time']})" if found["time"] else ""
    raise ValueError(
        f"{flag} {out} already holds {_result_name(found['by'])}{written}: choose another {flag}, or pass --overwrite "
        f"to replace it"
    )


def claim(out: str | Path, by: str, overwrite: bool, flag: str = "--output-dir", keep: tuple[str, ...] = ()) -> Held:
    """Own `out` for one result of `by`, before anything loads: checked (check_writable), held, and checked
    again under the hold (check_result_dir); with --overwrite the earlier result's files are deleted first
    (except `keep`), so nothing of it stays beside the new one, and a note says so. The mark (.result.json)
    says the result is unfinished until `finish(held)`. ValueError (one line) when it may not."""
    check_writable(out, flag)
    held = hold(out, by, flag)
    try:
        check_result_dir(out, by, overwrite, flag, keep)
    except ValueError:
        held.release()
        raise
    out = Path(out)
    earlier = occupant(out, keep)
    entries = sorted(p for p in out.iterdir() if p.name != ".lock" and p.name not in keep)
    for path in entries:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if earlier is not None and earlier.get("complete", True):
        print(f"note: --overwrite: deleted the earlier {earlier['by']} result in {out}", file=sys.stderr)
    elif earlier is not None and entries != [out / RESULT_MARK]:
        print(f"note: --overwrite: deleted the unfinished {earlier['by']} result in {out}", file=sys.stderr)
    for note in held.notes:
        print(note, file=sys.stderr)
    held.mark = out / RESULT_MARK
    held.mark.write_text(json.dumps({"kind": by, "time": _now(), "argv": sys.argv, "complete": False}))
    return held


def finish(held: Held):
    """The result is complete: its mark says so, and the folder is released."""
    held.mark.write_text(json.dumps(_read_json(held.mark) | {"complete": True}))
    held.mark = None
    held.release()


# ---------------------------------------------------------------------------------------------
# A training run's plan: what a trainer does with --output-dir, decided before anything is held or loaded.

# Arguments that can change on --resume without changing what the run is (when it evaluates, saves, logs,
# how it computes the same numbers). Every other argument differing from the run's is refused, except
# --num-epochs when DiffExp's exploration window stays where it was (see _same_exploration).
HARMLESS_ARGS = frozenset({
    "output_dir", "resume", "overwrite", "allow_changed_args", "config", "eval_every", "save_every", "keep_checkpoints",
    "track", "wandb_project", "kernels", "gradient_checkpointing", "compile", "progress", "fsdp", "cache_text",
})  # fmt: skip


@dataclass
class RunPlan:
    """What a trainer does with --output-dir (decided by plan_run): 'new' (empty or no directory),
    'overwrite' (delete the old run's files first), 'restart' (--resume of a run that stopped before its
    first checkpoint: clear its partial files, start at epoch 0) or 'resume' (continue from `checkpoint`).
    `changed`: argument -> [run's value, new value] accepted with --allow-changed-args; `finished`: a
    resumed run already holds its last epoch; `notes`: what to say about it."""

    mode: str
    checkpoint: Path | None = None
    changed: dict | None = None
    found: tuple[str, ...] = ()
    finished: bool = False
    notes: tuple[str, ...] = ()

    def record(self) -> dict:
        return {"mode": self.mode, "from_checkpoint": self.checkpoint.name if self.checkpoint else None} | (
            {"changed": self.changed} if self.changed else {}
        )


def recorded_args(out: str | Path) -> dict:
    """The arguments the run in `out` holds (args.json, flat); {} when there is none or it is unreadable."""
    return _read_json(Path(out) / "args.json") if str(out).strip() else {}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _flag_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def run_outputs(out: str | Path) -> tuple[str, ...]:
    """What a run in `out` computed (RUN_OUTPUTS present, folders with a trailing /): () for a folder
    that holds nothing to resume, e.g. only a .lock left by a run killed while starting."""
    out = Path(out)
    found = tuple(n + ("/" if (out / n).is_dir() else "") for n in RUN_OUTPUTS if (out / n).exists())
    if found == ("checkpoints/",) and not any((out / "checkpoints").iterdir()):
        found = ()  # an empty checkpoints/ (a run stopped while writing its first checkpoint leaves .tmp_*)
    return found


def plan_run(args: dict, trainer: str | None = None, family: str | None = None) -> RunPlan:
    """Decide what to do with the run folder args['output_dir'] given --resume / --overwrite /
    --allow-changed-args (`args`: the trainer's flat arguments, as args.json holds them), reading only.
    ValueError (one line, naming the flags and the fix) when the folder holds something else than a run,
    another trainer's run (which nothing continues), when --resume has nothing to resume, when the
    checkpoint to resume was written on another base model, or when --resume's arguments differ from the
    run's (args.json) in anything but HARMLESS_ARGS."""
    check_writable(args["output_dir"], "--output-dir")  # the string itself: Path('') would read '.'
    out = Path(args["output_dir"])
    if args["resume"] and args["overwrite"]:
        raise ValueError(
            "--resume and --overwrite contradict each other: --resume continues the run in --output-dir, --overwrite deletes it; pass one"
        )
    found_kind = occupant(out)
    if found_kind is not None and found_kind["kind"] == "result":
        raise ValueError(
            f"--output-dir {out} holds {_result_name(found_kind['by'])}: choose another --output-dir (a folder holds one result)"
        )
    found = run_outputs(out)
    ckpt = latest_checkpoint(out)
    if args["overwrite"]:
        return RunPlan("overwrite", found=found)
    if not args["resume"]:
        if ckpt is not None:
            raise ValueError(
                f"--output-dir {out} already holds a run (checkpoints up to {ckpt.name}): pass --resume to continue it, "
                f"choose another --output-dir, or pass --overwrite to delete its files and start again"
            )
        if found:
            raise ValueError(
                f"--output-dir {out} already holds a run that stopped before its first checkpoint ({', '.join(found)}): pass --resume "
                f"to restart it there from scratch, choose another --output-dir, or pass --overwrite to delete its files"
            )
        return RunPlan("new")
    # Who wrote the run: the checkpoint's own record, else run.json / args.json, else (a checkpoint from before
    # the records, its folder tidied) its training state.
    identity = (checkpoint_record(ckpt) if ckpt else {}) or run_identity(out) or {}
    if ckpt is not None and not identity.get("trainer"):
        identity = {"trainer": _trainer_from_state(ckpt)}
    if trainer and identity.get("trainer") not in (None, trainer):
        what = TRAINER_NAMES.get(identity["trainer"], identity["trainer"])
        on = f" on {FAMILY_NAMES.get(identity['family'], identity['family'])}" if identity.get("family") else ""
        raise ValueError(
            f"--resume: --output-dir {out} holds {what}{on}, which only its own trainer continues: resume it with "
            f"train_{identity['trainer']}.py, or choose another --output-dir"
        )
    if ckpt is None:
        if not found:
            raise ValueError(
                f"--resume: --output-dir {out} holds no run to resume (no checkpoints/, log.jsonl, eval/ or images/); drop --resume to start one there"
            )
        return RunPlan("restart", found=found)
    check_checkpoint_files(ckpt)
    if identity.get("family") not in (None, family) and family:
        raise ValueError(
            f"--resume: --output-dir {out} holds a run on {FAMILY_NAMES.get(identity['family'], identity['family'])}, "
            f"but --pretrained {args['pretrained']} is {FAMILY_NAMES.get(family, family)}: resume it with its own --pretrained"
        )
    changed, notes, old = {}, [], {}
    recorded = out / "args.json"
    if recorded.is_file():
        try:
            old = json.loads(recorded.read_text())
        except ValueError:
            raise ValueError(
                f"--resume: {recorded} is not valid JSON; restore it, or pass --overwrite to start the run again"
            ) from None
        changed = {k: [old[k], v] for k, v in args.items() if k not in HARMLESS_ARGS and k in old and old[k] != v}
        if "num_epochs" in changed and _same_exploration(old, args):
            del changed["num_epochs"]  # only the run's length changes: extending or shortening it is harmless
    if changed and not args["allow_changed_args"]:
        listed = ", ".join(_describe_change(k, a, b, old, args) for k, (a, b) in changed.items())
        raise ValueError(
            f"--resume: these arguments differ from the run's ({recorded}): {listed}; rerun with the run's values, "
            f"or pass --allow-changed-args to continue it with the new ones"
        )
    base_change = _base_change(ckpt, args)
    if base_change and not args["allow_changed_args"]:
        raise ValueError(
            f"--resume: {base_change}; resume on the base the run trained on, or pass --allow-changed-args to "
            f"continue on this one"
        )
    if base_change:
        notes.append(f"note: --allow-changed-args: continuing although {base_change}")
    if not checkpoint_record(ckpt):
        notes.append(
            f"note: --resume: checkpoint {ckpt} was written before checkpoints recorded their trainer and base model, so "
            f"--pretrained cannot be checked against the one it trained on; the next checkpoint records them"
        )
    epoch = int(ckpt.name.split("_", 1)[1])
    return RunPlan("resume", ckpt, changed, found, finished=epoch >= args["num_epochs"] - 1, notes=tuple(notes))


def _describe_change(key: str, old, new, old_args: dict, args: dict) -> str:
    """One changed argument as the refusal lists it, with why it matters where that is not plain."""
    text = f"{_flag(key)} {_flag_value(old)} -> {_flag_value(new)}"
    frac = args.get("explore_frac")
    if key == "num_epochs" and frac is not None and old_args.get("explore_frac") == frac:
        a, b = int(old), int(new)
        text += (
            f" (it moves DiffExp's exploration window, the first {frac:g} of the epochs: epochs "
            f"{_window(a, frac)} of {a}, {_window(b, frac)} of {b})"
        )
    return text


def _window(num_epochs: int, frac: float) -> str:
    n = sum(e < frac * num_epochs for e in range(num_epochs))
    return f"0-{n - 1}" if n > 0 else "none"


def _same_exploration(old: dict, new: dict) -> bool:
    """--num-epochs changes what a run is only through DiffExp's exploration window (the first
    explore_frac of the epochs): True when every epoch both runs have explores (or not) alike."""
    frac = new.get("explore_frac")
    if frac is None or old.get("explore_frac") != frac:
        return False
    a, b = int(old["num_epochs"]), int(new["num_epochs"])
    return all((e < frac * a) == (e < frac * b) for e in range(min(a, b)))


def prepare_run_dir(output_dir: str | Path, plan: RunPlan) -> list[str]:
    """Carry out a RunPlan's deletions (main process only): 'overwrite' deletes the old run's files
    (RUN_OUTPUTS and its identity and argument history), 'restart' its partial outputs (the history is
    kept and the new invocation appended). Files the trainers did not write are left alone. Returns what
    was deleted."""
    out = Path(output_dir)
    names = (
        RUN_OUTPUTS + (ARGS_FILES if plan.mode == "overwrite" else ()) if plan.mode in ("overwrite", "restart") else ()
    )
    deleted = []
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def run_dir_notes(output_dir: str | Path, plan: RunPlan, deleted: list[str]) -> list[str]:
    """The lines a trainer prints about what it did to --output-dir (restart, overwrite, accepted changes)."""
    notes = list(plan.notes)
    if plan.mode == "restart":
        notes.append(
            f"note: --resume: {output_dir} holds a run that stopped before its first checkpoint: restarting it from epoch 0 (deleted {', '.join(deleted)})"
        )
    elif plan.mode == "overwrite" and deleted:
        notes.append(f"note: --overwrite: deleted the previous run's files in {output_dir} ({', '.join(deleted)})")
    if plan.changed:
        notes.append(
            "note: --allow-changed-args: continuing with "
            + ", ".join(f"{_flag(k)} {a} -> {b}" for k, (a, b) in plan.changed.items())
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Logs: one JSON line per epoch (plain files always; Weights & Biases with --track).


class RunLog:
    """A run's files: run.json (which trainer and model family), args.json (the run's current arguments),
    args.jsonl (every invocation's arguments, appended: the history of the run), log.jsonl (one JSON line
    per epoch); Weights & Biases with --track. `enabled`: the process that writes (the main one)."""

    def __init__(self, out: str | Path, enabled: bool = True):
        self.dir, self.enabled, self.wandb = Path(out), enabled, None

    def start(self, args: dict, identity: dict | None = None, invocation: dict | None = None):
        """Write run.json (`identity`: trainer and family), args.json (`args`, flat) and append this
        invocation (time, command line, `invocation`: the plan's mode and changes) to args.jsonl."""
        if not self.enabled:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        current = jsonable(args)
        if identity is not None:
            (self.dir / "run.json").write_text(json.dumps(identity))
        (self.dir / "args.json").write_text(json.dumps(current, indent=2))
        entry = {"time": _now(), "argv": sys.argv[1:]} | jsonable(invocation or {})
        with open(self.dir / "args.jsonl", "a") as f:
            f.write(json.dumps(entry | {"args": current}) + "\n")
        if current.get("track"):
            import wandb

            self.wandb = wandb.init(project=current.get("wandb_project"), config=current, dir=str(self.dir))
        return self

    def log(self, record: dict, images: dict | None = None):
        if not self.enabled:
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
        if self.wandb is not None:
            import wandb

            extra = {k: wandb.Image(str(v)) for k, v in (images or {}).items()}
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(numbers | extra, step=record.get("samples"))

    def truncate_after(self, epoch: int) -> list[str]:
        """On resume from the checkpoint of `epoch`: drop what the epochs after it wrote (log lines, eval/ and
        images/ of those epochs: they will be redone). Returns notes on what the log lost before it (a
        missing log.jsonl, a torn line, missing epochs -1 .. `epoch`; -1 is the line a run logs before
        training): the run goes on, and says so."""
        if not self.enabled:
            return []
        path, notes = self.dir / "log.jsonl", []
        if not path.exists():
            notes.append(
                f"note: --resume: {path} is missing: the history of epochs 0-{epoch} is lost; the log goes on from epoch {epoch + 1}"
            )
        else:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            torn = [ln for ln in lines if _log_epoch(ln) is None]
            kept = [ln for ln in lines if _log_epoch(ln) is not None and _log_epoch(ln) <= epoch]
            path.write_text("".join(ln + "\n" for ln in kept))
            if torn:
                notes.append(
                    f"note: --resume: dropped {len(torn)} unreadable line(s) of {path} (cut while being written: the "
                    f"run was killed or the disk filled)"
                )
            have = {_log_epoch(ln) for ln in kept}
            missing = [e for e in range(-1, epoch + 1) if e not in have]
            if missing:
                shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
                notes.append(
                    f"note: --resume: {path} has no line for epoch(s) {shown} (lost: cut or edited); the log goes on "
                    f"from epoch {epoch + 1}"
                )
        for old in [*(self.dir / "eval").glob("epoch_*"), *(self.dir / "images").glob("epoch_*.png")]:
            try:
                later = int(old.name.split("_", 1)[1].split(".")[0]) > epoch
            except ValueError:
                continue
            if later:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        return notes


def _log_epoch(line: str) -> float | None:
    """A log line's epoch; None for a line that is not a JSON record (torn: the run was killed writing it)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("epoch", -1) if isinstance(record, dict) else None


def jsonable(x):
    """`x` with tensors as lists and anything else unknown as its str: what json.dumps takes."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):  # a tensor or an array
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------------------------------------
# Checkpoints. A checkpoint is a directory written under a temporary name and renamed into place, so a
# crash mid-write never leaves a half checkpoint behind. checkpoint.json records who wrote it on what:
# the trainer, the model family, --pretrained as given and a fingerprint of the base model's files.

CHECKPOINT_RECORD = "checkpoint.json"


def save_checkpoint(output_dir: str | Path, epoch: int, unet, state: dict, keep: int = 3, ema=None,
                    record: dict | None = None, lora=None) -> Path:  # fmt: skip
    """Write checkpoints/epoch_NNNN/ (diffusers LoRA weights + training state + `record`, the checkpoint's
    identity: see base_record) atomically, with the permissions of every other output (the umask's), and
    byte-identical for identical training; keep the last `keep` checkpoints (0: keep all). With an EMA
    (--ema-decay), its weights also go to epoch_NNNN/ema/ in the same LoRA format, so `sample.py --lora
    .../epoch_NNNN/ema` and diffusers' load_lora_weights use them (resume reads the EMA from
    training_state.pt). `lora`: (weights, EMA weights) gathered from a sharded denoiser
    (sharding.gathered_lora), written instead of `unet`'s."""
    import torch

    from diffusion import save_lora_weights

    weights, ema_weights = lora or (None, None)

    ckpt_root = Path(output_dir) / "checkpoints"
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = ckpt_root / f".tmp_epoch_{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora_weights(unet, tmp, weights)  # diffusers' LoRA format: the pipeline's load_lora_weights reads it
    _canonical_safetensors_header(tmp / "pytorch_lora_weights.safetensors")
    if ema is not None:
        with ema.swapped() if lora is None else contextlib.nullcontext():
            save_lora_weights(unet, tmp / "ema", ema_weights)
        _canonical_safetensors_header(tmp / "ema" / "pytorch_lora_weights.safetensors")
    torch.save(state, tmp / "training_state.pt")
    if record is not None:
        (tmp / CHECKPOINT_RECORD).write_text(json.dumps(record | {"epoch": epoch}, indent=1, sort_keys=True))
    mode = 0o666 & ~_umask()  # safetensors writes 0600 (a private temp file renamed into place)
    for f in tmp.rglob("*"):
        os.chmod(f, 0o777 & ~_umask() if f.is_dir() else mode)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _canonical_safetensors_header(path: Path):
    """Rewrite a .safetensors file's JSON header with the metadata keys sorted and the tensors in the
    order of their data: safetensors writes the metadata map in the (per-process random) order of a
    hash map, so two identical runs would otherwise write different bytes. The tensor data is untouched."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    tensors = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    canonical = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(tensors)
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (
        -len(text) % 8
    )  # the data starts 8-byte aligned: the header padded with spaces, as safetensors does
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (by epoch number, not by name)."""
    found = []
    for path in (Path(output_dir) / "checkpoints").glob("epoch_*"):
        try:
            found.append((int(path.name.split("_", 1)[1]), path))
        except ValueError:
            continue
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_record(ckpt: Path) -> dict:
    """The identity a checkpoint recorded ({'trainer', 'family', 'pretrained', 'base', 'epoch'}); {} for a
    checkpoint written before checkpoints recorded it."""
    return _read_json(Path(ckpt) / CHECKPOINT_RECORD)


def _trainer_from_state(ckpt: Path) -> str | None:
    """The trainer of a checkpoint that records none, from its training state: DDPO's always holds its
    per-prompt tracker ('stat_tracker'), AlignProp's never does."""
    import torch

    with contextlib.suppress(Exception):
        state = torch.load(ckpt / "training_state.pt", weights_only=True, map_location="cpu")
        return "ddpo" if "stat_tracker" in state else "alignprop"
    return None


def check_checkpoint_files(ckpt: Path):
    """The newest checkpoint must hold readable weights and state before anything loads: a deleted or
    truncated file is found here, not after minutes of loading (or mistaken for a finished run)."""
    for name in ("pytorch_lora_weights.safetensors", "training_state.pt"):
        path = ckpt / name
        ok = path.is_file() and path.stat().st_size > 8
        if ok and name.endswith(".safetensors"):
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    ok = 8 + n + end == size
                except (ValueError, KeyError, TypeError):
                    ok = False
        if not ok:
            raise ValueError(
                f"--resume: checkpoint {ckpt} is incomplete ({name} is {'missing' if not path.is_file() else 'truncated'}); "
                f"delete {ckpt} to resume from the checkpoint before it"
            )
    if (ckpt / CHECKPOINT_RECORD).exists() and not checkpoint_record(ckpt):
        raise ValueError(
            f"--resume: checkpoint {ckpt} is incomplete ({CHECKPOINT_RECORD} is unreadable); delete {ckpt} to resume "
            f"from the checkpoint before it"
        )


def load_checkpoint(ckpt: Path, unet) -> dict:
    """Load LoRA weights into `unet` (which already has adapters) and return the training state."""
    import torch
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffusion import CheckpointError, lora_weights_to_peft

    try:
        weights = load_file(ckpt / "pytorch_lora_weights.safetensors")
        state = torch.load(ckpt / "training_state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing to the user
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete that directory to resume from the one before it"
        ) from None
    peft_weights = lora_weights_to_peft(weights)
    incompatible = set_peft_model_state_dict(unet, peft_weights)
    if getattr(incompatible, "unexpected_keys", None):
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' does not match this model's LoRA layout (check --lora-rank and --pretrained)"
        )
    return state


# --- the base model's fingerprint ------------------------------------------------------------------------
# Cheap, not a hash of gigabytes: per component folder (unet/, vae/, text_encoder/, ...) a SHA-256 over
# its config and tokenizer files (*.json, *.txt: whole) and its weight files (each file's name and size,
# its safetensors header: every tensor's name, dtype, shape and offsets, and 16 slices of 4 KiB spread
# evenly from the file's start to its end). Weights replaced at the same path (a fine-tune of the same architecture: the same
# header and size) differ in the slices. Only the files the loader reads count: safetensors over .bin,
# and no variants (diffusion_pytorch_model.fp16.safetensors), so a later download of another variant
# does not change it. About 1 MB read for SD 1.5.

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _resolve_base(name: str) -> Path | None:
    """The local folder of a base model given as a directory, a shipped short name or a cached hub id."""
    from diffusion import ALIASES

    name = os.path.expanduser(str(ALIASES.get(str(name), name)))
    if os.path.isdir(name):
        return Path(name)
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(name, "model_index.json")
        if isinstance(index, str):
            return Path(index).parent
        config = try_to_load_from_cache(name, "config.json")  # a single model (a --vae)
        if isinstance(config, str):
            return Path(config).parent
    return None


def _fingerprint_folder(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES and "." not in p.name[: -len(p.suffix)]]
    if any(p.suffix == ".safetensors" for p in weights):
        weights = [p for p in weights if p.suffix == ".safetensors"]
    h = hashlib.sha256()
    for p in files:
        if p.suffix in (".json", ".txt") and p.stat().st_size < 50 * 2**20:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            if p.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 * 2**20)))
            for k in range(16):  # from the first 4 KiB to the last
                f.seek(max(0, size - 4096) * k // 15)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def base_fingerprint(pretrained: str, vae: str | None = None) -> dict | None:
    """{component: digest} of the base model's files (model_index.json and each component folder; --vae's
    folder in place of vae/); None when the model is not on this machine (a hub id not downloaded yet)."""
    root = _resolve_base(pretrained)
    if root is None:
        return None
    out = {}
    if (root / "model_index.json").is_file():
        out["model_index.json"] = hashlib.sha256((root / "model_index.json").read_bytes()).hexdigest()[:16]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = _fingerprint_folder(sub)
    if vae is not None:
        vae_root = _resolve_base(vae)
        out["vae"] = _fingerprint_folder(vae_root) if vae_root is not None else "unknown"
    return out


def base_record(trainer: str, family: str, pretrained: str, vae: str | None = None) -> dict:
    """What each checkpoint records about who wrote it on what (checkpoint.json)."""
    return {"trainer": trainer, "family": family, "pretrained": pretrained, "vae": vae,
            "base": base_fingerprint(pretrained, vae)}  # fmt: skip


def _base_change(ckpt: Path, args: dict) -> str | None:
    """How the base model (--pretrained, --vae) differs from the one checkpoint `ckpt` was trained on, in
    words; None when it does not, or when either side cannot be read (a checkpoint that records none, a
    hub model not on this machine)."""
    recorded = checkpoint_record(ckpt).get("base")
    if not recorded:
        return None
    now = base_fingerprint(args["pretrained"], args.get("vae"))
    if now is None:
        return None
    differ = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if not differ:
        return None
    return (
        f"--pretrained {args['pretrained']} is not the base model checkpoint {ckpt.name} was trained on: it differs in "
        f"{', '.join(differ)} (files, sizes or weights; recorded in {ckpt / CHECKPOINT_RECORD})"
    )


def recorded_base(lora: str | Path) -> tuple[str, str] | None:
    """(--pretrained, the file that says so) of the base a trainer's LoRA checkpoint was trained on:
    its checkpoint.json, else its run's args.json; `lora` a checkpoints/epoch_NNNN folder or its ema/.
    None when neither says (a LoRA from elsewhere)."""
    lora = Path(lora)
    ckpt = lora.parent if lora.name == "ema" else lora
    if checkpoint_record(ckpt).get("pretrained"):
        return checkpoint_record(ckpt)["pretrained"], str(ckpt / CHECKPOINT_RECORD)
    args = _read_json(ckpt.parent.parent / "args.json") if ckpt.parent.name == "checkpoints" else {}
    if args.get("pretrained"):
        return args["pretrained"], str(ckpt.parent.parent / "args.json")
    return None


# ---------------------------------------------------------------------------------------------
# The per-epoch sample grid.


def save_sample_grid(images, prompts: list[str], path: str | Path, columns: int | None = None,
                     tile: tuple[int, int] = (128, 256)):  # fmt: skip
    """A PNG grid of `images` (N x 3 x H x W, uint8 or floats in [0, 1]) with each prompt written under
    its image. Tiles are scaled to between tile[0] and tile[1] pixels (small images by a whole factor,
    nearest neighbour, so pixels stay sharp)."""
    import math

    import torch
    from PIL import Image, ImageDraw, ImageFont

    images = images.detach().cpu()
    if images.is_floating_point():
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = images.shape
    scale = max(1, -(-tile[0] // max(h, w))) if max(h, w) < tile[0] else min(1.0, tile[1] / max(h, w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    font = ImageFont.load_default()
    line_h = int(font.getbbox("Ag")[3]) + 2
    caption_h = 2 * line_h + 4
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = Image.new("RGB", (columns * (tw + 4) + 4, rows * (th + caption_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = 4 + (i % columns) * (tw + 4), 4 + (i // columns) * (th + caption_h + 4)
        img = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        img = img.resize((tw, th), Image.NEAREST if scale >= 1 else Image.LANCZOS)
        grid.paste(img, (x, y))
        for k, line in enumerate(wrap_caption(draw, str(prompts[i]) if i < len(prompts) else "", font, tw)):
            draw.text((x, y + th + 2 + k * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def wrap_caption(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """`text` in at most `max_lines` lines no wider than `width` pixels, cut with '...' where it does not
    fit. Only the first max_lines * width characters are read (no glyph is narrower than a pixel), so a
    prompt of megabytes costs what a short one does."""
    limit = max_lines * width
    words = text[: limit + 1].split()
    lines, i = [], 0
    while i < len(words) and len(lines) < max_lines:
        line, i = words[i], i + 1
        while i < len(words) and draw.textlength(f"{line} {words[i]}", font=font) <= width:
            line, i = f"{line} {words[i]}", i + 1
        lines.append(line)
    overflow = i < len(words) or len(text) > limit  # more text than the lines show: the last one ends in '...'
    for k, line in enumerate(lines):
        last = overflow and k == len(lines) - 1
        if last and i < len(words):
            line = f"{line} {' '.join(words[i:])}"
        if last or draw.textlength(line, font=font) > width:
            lo, hi = 0, len(line)  # the longest prefix that fits with '...': binary search
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if draw.textlength(line[:mid] + "...", font=font) <= width else (lo, mid - 1)
            lines[k] = line[:lo] + "..."
    return lines
