"""Checkpoint files of `fit`: finding the newest readable one, and cleaning leftovers."""

import os
import re
import shutil

import tensorflow as tf

_CHECKPOINT_NAME = "ckpt"
_CHECKPOINT_RE = re.compile(r"^" + _CHECKPOINT_NAME + r"-(\d+)\.(index|data-\d+-of-\d+)$")
_TEMP_RE = re.compile(r"^" + _CHECKPOINT_NAME + r"-\d+_temp(_[0-9a-f]+)?$")
_STATE_FILE = "checkpoint"


class CheckpointWarning(UserWarning):
    """A checkpoint file could not be read and an older checkpoint is used instead."""


class CheckpointError(RuntimeError):
    """No checkpoint in a checkpoint folder can be read, or one belongs to another model."""


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
        return os.path.join(directory, data[0]) if len(data) == 1 else f"{prefix}.data-*", \
            _first_line(e)
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
