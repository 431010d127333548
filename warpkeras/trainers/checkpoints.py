"""Checkpoint folders of `fit`: finding the newest readable checkpoint, cleaning leftovers,
the one-writer lock, and the run settings recorded with every checkpoint."""

import datetime
import json
import os
import re
import shutil
import socket
import types
import warnings

import tensorflow as tf

fcntl: types.ModuleType | None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_CHECKPOINT_NAME = "ckpt"
_CHECKPOINT_RE = re.compile(r"^" + _CHECKPOINT_NAME + r"-(\d+)\.(index|data-\d+-of-\d+)$")
_TEMP_RE = re.compile(r"^" + _CHECKPOINT_NAME + r"-\d+_temp(_[0-9a-f]+)?$")
_STATE_FILE = "checkpoint"


class CheckpointWarning(UserWarning):
    """A run goes on despite something in its checkpoint folder: a damaged file passed over
    for an older checkpoint, settings changed on resume (the new values win), the lock of an
    ended run taken over, or another run's checkpoints moved aside."""


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be resumed: no checkpoint in it can be read, its newest
    checkpoint belongs to another model, trainer, objectives or optimiser, or to another
    run (another seed or configuration), or every checkpoint its state file lists is
    missing. The message names the cause; nothing in the folder was written."""


# ----------------------------------------------------------------------------------------
# checkpoint files
def _checkpoint_files(directory):
    """``{number: [file names]}`` of the ``ckpt-N`` checkpoints in `directory`."""
    found = {}
    for name in os.listdir(directory):
        m = _CHECKPOINT_RE.match(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def _unreadable_file(directory, number, names):
    """The file of checkpoint ``ckpt-<number>`` that cannot be read and why, or None."""
    prefix = os.path.join(directory, f"{_CHECKPOINT_NAME}-{number}")
    index = f"{_CHECKPOINT_NAME}-{number}.index"
    if index not in names:
        return f"{prefix}.index", "missing"
    data = sorted(n for n in names if n != index)
    for name in [index] + data:
        if os.path.getsize(os.path.join(directory, name)) == 0:
            return os.path.join(directory, name), "empty"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError, IndexError) as e:
        return f"{prefix}.index", _first_line(e)
    shards = re.findall(r"of-(\d+)$", data[0]) if data else []
    if not data or len(data) != int(shards[0]):
        return f"{prefix}.data-*", "missing data shard"
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)  # reads every byte: catches truncation and bad checksums
    except (tf.errors.OpError, ValueError, IndexError) as e:
        return os.path.join(directory, data[0]) if len(
            data
        ) == 1 else f"{prefix}.data-*", _first_line(e)
    return None


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _state_file_problem(directory):
    """Why the ``checkpoint`` state file of `directory` cannot be used, or None."""
    path = os.path.join(directory, _STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, UnicodeDecodeError) as e:
        return _first_line(e)
    if state is None or not state.model_checkpoint_path:
        return "not a checkpoint state (unparsable or empty)"
    latest = os.path.basename(state.model_checkpoint_path)
    if not os.path.exists(os.path.join(directory, latest + ".index")):
        return f"it names '{latest}', which is not in the folder"
    return None


def remove_checkpoint_leftovers(directory):
    """Removes the ``ckpt-N_temp`` folders that a run killed while writing a checkpoint
    leaves in `directory`. Returns the removed paths."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _TEMP_RE.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------
# one writer per folder
_LOCK_FILE = "writer.lock"


class CheckpointLockError(CheckpointError):
    """Another running process writes checkpoints into the same folder."""


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: assume it runs
    return True


class FolderLock:
    """The lock that makes one process the only writer of a checkpoint folder.

    The lock is the file ``<folder>/writer.lock``: its holder keeps an exclusive
    `fcntl.flock` on it and writes itself into it as JSON, ``{"host", "pid", "started"}``
    (``started``: UTC, ISO 8601). The operating system drops the flock when the holder
    ends, however it ends (SIGKILL included), so a lock file whose flock is free was left by
    a run that has ended: it is taken over, with a `CheckpointWarning` naming that run. A
    lock file naming another host is refused even so (its flock may not reach this host on
    a network file system); delete it once that run has ended. Where `fcntl` is missing
    (Windows), the file is created exclusively and its holder's process is checked by pid.

    Args:
        folder: the checkpoint folder (it exists).
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, _LOCK_FILE)
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self._fd = None

    @staticmethod
    def _describe(holder):
        if not holder:
            return "an unreadable or empty lock"
        return (
            f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {holder.get('started')}"
        )

    def _read(self):
        try:
            with open(self.path) as f:
                holder = json.loads(f.read() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _in_use(self, holder):
        return CheckpointLockError(
            f"Checkpoint folder '{self.folder}' is in use by another run "
            f"({self._describe(holder)}; lock file '{self.path}'). Two runs writing one "
            "folder would overwrite each other's checkpoints: give this run its own "
            "checkpoint_dir, or stop the other run first."
        )

    def _other_host(self, holder):
        return CheckpointLockError(
            f"Checkpoint folder '{self.folder}' is locked by a run on another machine "
            f"({self._describe(holder)}; lock file '{self.path}'), whose process cannot be "
            "checked from here. Give this run its own checkpoint_dir, or, if that run has "
            "ended, delete the lock file."
        )

    def _taken_over(self, holder):
        warnings.warn(
            f"Checkpoint folder '{self.folder}': taking over the lock of a run that has "
            f"ended ({self._describe(holder)}); its checkpoints are kept.",
            CheckpointWarning,
            stacklevel=4,
        )

    def acquire(self):
        """Takes the lock.

        Returns:
            self.

        Raises:
            CheckpointLockError: a running process (named by host, pid and start time)
                holds it, or a lock file names another host.
        """
        if fcntl is None:
            return self._acquire_by_pid()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._in_use(self._read()) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file while this run opened it: again
                os.close(fd)
                continue
            holder = self._read()
            if holder.get("host") not in (None, self.holder["host"]):
                os.close(fd)
                raise self._other_host(holder)
            if holder:
                self._taken_over(holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.holder).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise CheckpointLockError(
            f"Could not take the lock file '{self.path}' (other runs keep replacing it)."
        )

    def _acquire_by_pid(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.holder))
                return self
            except FileExistsError:
                pass
            holder = self._read()
            if holder.get("host") not in (None, self.holder["host"]):
                raise self._other_host(holder)
            pid = holder.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and _process_alive(pid):
                raise self._in_use(holder)
            self._taken_over(holder)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise CheckpointLockError(f"Could not take the lock file '{self.path}'.")

    def release(self):
        """Removes the lock file (if it is still this run's) and drops the lock."""
        if self._fd is None:
            if self._read() == self.holder:
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------------------
# settings recorded with every checkpoint
_SETTINGS_KEY = "run_settings"
# configuration keys the user may change on resume: the new value wins, with a warning
HYPERPARAMETERS = frozenset(
    {
        "inner_learning_rate",
        "inner_momentum",
        "inner_steps",
        "meta_batch_size",
        "group_size",
        "parallel",
        "batch_size",
        "learning_rate",
        "init_weight",
        "meta_interval",
        "unroll",
        "recompute",
    }
)  # MAML's: how the steps are computed, not what


def read_settings(prefix):
    """The settings recorded with checkpoint `prefix` (a dict), or None for a checkpoint
    written before they were recorded."""
    reader = tf.train.load_checkpoint(prefix)
    key = f"{_SETTINGS_KEY}/.ATTRIBUTES/VARIABLE_VALUE"
    if not reader.has_tensor(key):
        return None
    value = reader.get_tensor(key)
    return json.loads(value.decode() if isinstance(value, bytes) else str(value))


def _flatten(config, prefix=""):
    """``{"a.b.0.c": value}`` of a nested config."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(config, (list, tuple)):
        out = {}
        for i, v in enumerate(config):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out if config else {prefix[:-1]: []}
    return {prefix[:-1]: config}


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)), 1e-30)
        except (TypeError, ValueError):
            return False
    return a == b


def compare_settings(recorded, current):
    """Sorts the differences between the settings of a checkpoint and of this run.

    Args:
        recorded: the checkpoint's settings (`read_settings`).
        current: this run's settings, in the same form.

    Returns:
        ``(refused, identity, changed)``: lists of strings. `refused`: what cannot continue
        (another trainer class, model variables, optimiser class or slot variables, other
        objectives); `identity`: differences that make it another run (the seed, other
        configuration), allowed only when taking the folder over; `changed`: hyperparameters
        (learning rates, steps, batch sizes) whose new value wins, as
        ``"key: old -> new"``.
    """
    refused, identity, changed = [], [], []
    rc, cc = recorded.get("config", {}), current.get("config", {})
    if rc.get("class") != cc.get("class"):
        refused.append(f"trainer class {rc.get('class')} -> {cc.get('class')}")
    r_obj = [o.get("class") for o in rc.get("objectives", [])]
    c_obj = [o.get("class") for o in cc.get("objectives", [])]
    if r_obj != c_obj:
        refused.append(f"objectives {r_obj} -> {c_obj}")
    rv = {p: s for p, s in recorded.get("variables", [])}
    cv = {p: s for p, s in current.get("variables", [])}
    for p in sorted(set(rv) | set(cv)):
        if rv.get(p) != cv.get(p):
            refused.append(
                f"model variable '{p}': shape {rv.get(p)} -> {cv.get(p)}".replace("None", "absent")
            )
    ro, co = recorded.get("optimizers", {}), current.get("optimizers", {})
    for name in sorted(set(ro) | set(co)):
        a, b = ro.get(name), co.get(name)
        if a is None or b is None or a["class"] != b["class"]:
            refused.append(f"{name} class {a and a['class']} -> {b and b['class']}")
            continue
        if sorted(map(tuple, a["variables"])) != sorted(map(tuple, b["variables"])):
            refused.append(
                f"{name} slot variables {[v[0] for v in a['variables']]} -> "
                f"{[v[0] for v in b['variables']]}"
            )
        fa, fb = _flatten(a["config"]), _flatten(b["config"])
        for key in sorted(set(fa) | set(fb)):
            if key != "name" and not _same(fa.get(key), fb.get(key)):
                changed.append(f"{name}.{key}: {fa.get(key)!r} -> {fb.get(key)!r}")
    if rc.get("seed") != cc.get("seed"):
        identity.append(f"seed {rc.get('seed')!r} -> {cc.get('seed')!r}")
    skip = {"class", "objectives", "seed"}
    fr = {k: v for k, v in _flatten(rc).items() if k.split(".")[0] not in skip}
    fc = {k: v for k, v in _flatten(cc).items() if k.split(".")[0] not in skip}
    # objectives' own settings (but not their optimiser, compared above)
    for i, (a, b) in enumerate(zip(rc.get("objectives", []), cc.get("objectives", []))):
        for key, value in _flatten(a, f"objectives.{i}.").items():
            fr[key] = value
        for key, value in _flatten(b, f"objectives.{i}.").items():
            fc[key] = value
    for key in sorted(set(fr) | set(fc)):
        parts = key.split(".")
        if "optimizer" in parts or "meta_optimizer" in parts or parts[-1] == "class":
            continue  # optimisers are compared by their checkpoint item above
        if _same(fr.get(key), fc.get(key)):
            continue
        text = f"{key}: {fr.get(key)!r} -> {fc.get(key)!r}"
        (changed if parts[-1] in HYPERPARAMETERS else identity).append(text)
    return refused, identity, changed


def move_aside(directory):
    """Moves the checkpoints of `directory` (``ckpt-N.*`` and the state file) into a new
    ``superseded-<UTC time>`` folder inside it, and returns that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(directory, f"superseded-{stamp}")
    os.makedirs(target)
    for name in os.listdir(directory):
        if _CHECKPOINT_RE.match(name) or name == _STATE_FILE:
            os.replace(os.path.join(directory, name), os.path.join(target, name))
    return target


def listed_checkpoints(directory):
    """The checkpoint prefixes the state file of `directory` lists (empty when it has none
    or cannot be read)."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, UnicodeDecodeError):
        return []
    if state is None:
        return []
    names = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    return [os.path.basename(n) for n in names if n]
