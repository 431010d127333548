"""Replay buffer of task parameterisations for offline WarpGrad (Algorithm 2)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

_SPILL_RE = re.compile(r"^warpkeras-buffer-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


def _spill_prefix():
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    return f"warpkeras-buffer-{host}-{os.getpid()}-"


def remove_stale_spill_dirs(root: str | os.PathLike) -> list[str]:
    """Removes ``warpkeras-buffer-<host>-<pid>-*`` spill folders in `root` whose process, on
    this host, has ended (a run killed before it could clean up). Folders of running
    processes, of other hosts, or not named this way are left alone. Returns the removed
    paths."""
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    host = _spill_prefix().split("-")[2]
    for name in os.listdir(root):
        m = _SPILL_RE.match(name)
        if not m or m.group("host") != host or int(m.group("pid")) == os.getpid():
            continue
        try:
            os.kill(int(m.group("pid")), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue  # exists under another user, or cannot tell: keep
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
    return removed


class ReplayBuffer:
    """Stores points (θ_k, momentum buffer) of task trajectories for offline warp updates.

    Offline meta-training (WarpGrad Algorithm 2) first adapts a meta-batch of tasks,
    appending every visited θ_k to the buffer (θ_0 … θ_K, K + 1 points per task, lines 4
    and 9; `MetaTrainer`'s ``buffer_final_point=False`` leaves out θ_K), then samples the
    stored points without replacement and takes warp-parameter steps on mini-batches of
    them. The buffer is a Monte-Carlo sample of the joint task-parameter distribution
    p(τ, θ) of Eq. 3.

    Memory is (K + 1) × |θ| × tasks floats (twice that with a momentum buffer) when every
    point is kept. Two ways bound it:

    * ``capacity`` with ``overflow="reservoir"``: keep a uniform random sample of
      `capacity` points of the stream (reservoir sampling), in memory;
    * ``overflow="spill"``: keep every point, but write points beyond `capacity` to
      `spill_dir` as ``.npy`` files, read back when sampled.

    Example:

    ```python
    buf = ReplayBuffer(capacity=1000)
    buf.add(task_id=0, step=3, theta=[np.zeros(4)])
    for entry in buf.drain(np.random.default_rng(0)):
        ...
    ```

    Args:
        capacity: points held in memory (`None`: unbounded).
        overflow: ``"reservoir"`` or ``"spill"``, what happens past `capacity`.
        spill_dir: folder for spilled points (default: a temporary folder, removed by
            `clear`).
        seed: seed of the reservoir's generator.
    """

    def __init__(
        self,
        capacity: int | None = None,
        overflow: str = "reservoir",
        spill_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        if overflow not in ("reservoir", "spill"):
            raise ValueError(f"overflow={overflow!r}: expected 'reservoir' or 'spill'.")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}.")
        self.capacity = capacity
        self.overflow = overflow
        self._spill_root = spill_dir
        self._spill_dir = None
        self._rng = np.random.default_rng(seed)
        self.clear()

    def clear(self) -> None:
        """Empties the buffer (and removes spilled files)."""
        self._memory: list[dict] = []
        self._spilled: list[dict] = []
        self.seen = 0
        if self._spill_dir is not None and os.path.isdir(self._spill_dir):
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        self._spill_dir = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def nbytes(self) -> int:
        """Bytes of parameter data held in memory."""
        return sum(
            sum(a.nbytes for a in e["theta"]) + sum(a.nbytes for a in e["velocity"] or [])
            for e in self._memory
        )

    def add(
        self,
        task_id: int,
        step: int,
        theta: Sequence[np.ndarray],
        velocity: Sequence[np.ndarray] | None = None,
    ) -> None:
        """Appends θ_k (and its momentum buffer) of task `task_id` at step `step`."""
        entry = {
            "task_id": int(task_id),
            "step": int(step),
            "theta": [np.asarray(t) for t in theta],
            "velocity": None if velocity is None else [np.asarray(v) for v in velocity],
        }
        self.seen += 1
        if self.capacity is None or len(self._memory) < self.capacity:
            self._memory.append(entry)
        elif self.overflow == "reservoir":
            j = self._rng.integers(0, self.seen)
            if j < self.capacity:
                self._memory[j] = entry
        else:
            self._spilled.append(self._spill(entry))

    def remove_stale_spills(self) -> None:
        """Removes the spill folders that killed runs left in this buffer's spill root
        (see `remove_stale_spill_dirs`); only with ``overflow="spill"``."""
        if self.overflow == "spill":
            remove_stale_spill_dirs(self._spill_root or tempfile.gettempdir())

    def _spill(self, entry):
        if self._spill_dir is None:
            root = self._spill_root or tempfile.gettempdir()
            os.makedirs(root, exist_ok=True)
            remove_stale_spill_dirs(root)
            self._spill_dir = tempfile.mkdtemp(prefix=_spill_prefix(), dir=root)
        path = os.path.join(self._spill_dir, f"{len(self._spilled):08d}.npz")
        arrays = {f"t{i}": a for i, a in enumerate(entry["theta"])}
        if entry["velocity"] is not None:
            arrays.update({f"v{i}": a for i, a in enumerate(entry["velocity"])})
        np.savez(path, **arrays)
        return {
            "task_id": entry["task_id"],
            "step": entry["step"],
            "path": path,
            "n": len(entry["theta"]),
            "has_velocity": entry["velocity"] is not None,
        }

    @staticmethod
    def _load(ref):
        with np.load(ref["path"]) as data:
            theta = [data[f"t{i}"] for i in range(ref["n"])]
            velocity = [data[f"v{i}"] for i in range(ref["n"])] if ref["has_velocity"] else None
        return {
            "task_id": ref["task_id"],
            "step": ref["step"],
            "theta": theta,
            "velocity": velocity,
        }

    def drain(self, rng: np.random.Generator) -> Iterator[dict]:
        """Yields every stored point once, in random order (sampling without replacement,
        Algorithm 2 line 14)."""
        n_mem = len(self._memory)
        # a canonical order first, so that the draw does not depend on the order in which
        # tasks were adapted (one after another, or side by side)
        keys = [(e["task_id"], e["step"]) for e in self._memory]
        keys += [(e["task_id"], e["step"]) for e in self._spilled]
        canonical = sorted(range(len(keys)), key=keys.__getitem__)
        for j in rng.permutation(len(canonical)):
            i = canonical[j]
            yield self._memory[i] if i < n_mem else self._load(self._spilled[i - n_mem])

    def __del__(self):
        try:
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
