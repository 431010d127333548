"""Checks of trainer arguments and of task data against the model, with messages naming
the argument or task and the fix."""

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras._losses import TaskLoss, join_batch, split_targets
from warpkeras.meta import MetaObjective, MetaTrainingError


def _resolve_loss(loss, where="MetaTrainer", model=None, loss_weights=None):
    """`loss` (as `keras.Model.compile` takes it) as a `warpkeras._losses.TaskLoss`."""
    if loss is None:
        raise MetaTrainingError(
            f"{where}: a loss is required: a Keras loss name (e.g. "
            "loss='sparse_categorical_crossentropy' or loss='mse'), a keras.losses.Loss, a "
            "serialised Keras loss, a callable fn(y_true, y_pred), or a dict / list of these "
            "per output."
        )
    try:
        return TaskLoss(loss, loss_weights=loss_weights, model=model, where=where)
    except ValueError as e:
        raise MetaTrainingError(str(e)) from None


def _check_head_layers(head_layers, where):
    """`head_layers` as a list of Keras layers (a single layer is wrapped), or `None`."""
    if head_layers is None:
        return None
    if isinstance(head_layers, keras.layers.Layer):
        return [head_layers]
    if not isinstance(head_layers, (list, tuple)) or not all(
        isinstance(h, keras.layers.Layer) for h in head_layers
    ):
        raise TypeError(
            f"{where}: head_layers={_v.describe(head_layers)} is not valid: expected a list "
            "of the model's Keras layers forming the head, e.g. "
            "head_layers=[model.layers[-1]]."
        )
    return list(head_layers)


def _check_objectives(objectives, where):
    if objectives is None:
        return None
    if isinstance(objectives, MetaObjective):
        objectives = [objectives]
    if not isinstance(objectives, (list, tuple)) or not all(
        isinstance(o, MetaObjective) for o in objectives
    ):
        raise TypeError(
            f"{where}: objectives={_v.describe(objectives)} is not valid: expected a list of "
            "warpkeras.meta.MetaObjective, e.g. objectives=[warpkeras.meta.WarpObjective("
            "'offline'), warpkeras.meta.Leap()]."
        )
    if len({id(o) for o in objectives}) != len(objectives):
        raise MetaTrainingError(f"{where}: objectives lists the same objective twice.")
    return list(objectives)


class TaskDataExhaustedError(RuntimeError):
    """A task's generator of adaptation or meta batches ran out of batches."""


class InputChecks:
    """Input and label checks of `MetaTrainer` (needs ``model`` and ``loss``)."""

    def _label_limit(self):
        """Number of classes C of a sparse categorical loss (labels must lie in [0, C)),
        read from the model's output; `None` when the loss takes no class ids or the output
        width is unknown."""
        if not hasattr(self, "_label_limit_value"):
            kinds = self.loss.kinds() if hasattr(self.loss, "kinds") else []
            limit = None
            if len(kinds) == 1 and kinds[0].category == "sparse_categorical":
                outputs = getattr(self.model, "outputs", None)
                try:
                    if outputs and len(outputs) == 1:
                        width = outputs[0].shape[-1]
                        limit = int(width) if width is not None else None
                except (AttributeError, TypeError, ValueError, IndexError):
                    limit = None
            self._label_limit_value = limit
        return self._label_limit_value

    def _check_labels(self, task, y, which):
        """Refuses class ids outside [0, C) of a sparse categorical loss, naming the task.

        A cheap numpy check (min / max of the batch's labels); without it such labels fail
        deep inside the compiled step with a long graph error, or on some devices give a
        NaN loss and the task is silently dropped.
        """
        limit = self._label_limit()
        if limit is None or isinstance(y, (dict, list, tuple)):
            return
        y = np.asarray(y)
        if y.size == 0 or y.dtype.kind not in "iuf":
            return
        lo, hi = y.min(), y.max()
        if lo >= 0 and hi < limit and (y.dtype.kind != "f" or np.all(np.isfinite(y))):
            return
        name = getattr(task, "name", "task")
        raise ValueError(
            f"Task '{name}': its {which} labels must be class ids in [0, {limit}) for the "
            f"model's {limit}-unit output and the sparse categorical loss, but a batch holds "
            f"labels in [{lo}, {hi}]. Relabel the task's classes as 0..{limit - 1} (e.g. "
            "y = np.unique(y, return_inverse=True)[1]) or give the head enough units."
        )

    def _check_inputs(self, task, x, which):
        """Refuses inputs whose structure or feature shapes cannot feed the model (a
        one-input task for a two-input model, dict keys that are not the model's input
        names, a wrong feature size), naming the task, what it holds and what the model
        takes. Models without a known input structure (subclassed) are not checked."""
        expected = getattr(self.model, "_inputs_struct", None)
        if expected is None:
            return
        name = getattr(task, "name", "task")

        def describe(structure):
            return str(
                tf.nest.map_structure(lambda t: tuple(getattr(t, "shape", np.shape(t))), structure)
            )

        def refuse(detail):
            raise ValueError(
                f"Task '{name}': its {which} inputs do not fit the model '{self.model.name}': "
                f"{detail}. The task holds x of shape {describe(x)}; the model takes "
                f"{describe(expected)} (batch dimension first). Give the task's x the "
                "model's input structure: one array for one input, a tuple/list in the "
                "order of model.inputs, or a dict keyed by the input names."
            )

        try:
            if isinstance(expected, dict) and isinstance(x, dict):
                if set(expected) != set(x):
                    refuse(
                        f"its dict keys {sorted(x)} are not the model's input names "
                        f"{sorted(expected)}"
                    )
                pairs = [(expected[k], x[k]) for k in expected]
            else:
                tf.nest.assert_same_structure(expected, x, check_types=False)
                pairs = list(zip(tf.nest.flatten(expected), tf.nest.flatten(x)))
        except (ValueError, TypeError) as e:
            if isinstance(e, ValueError) and str(e).startswith(f"Task '{name}'"):
                raise
            refuse("the number or nesting of its inputs differs")
        for spec, value in pairs:
            want, got = tuple(spec.shape)[1:], tuple(np.shape(value))[1:]
            # Keras adds or drops a trailing axis of size 1 (`_adjust_input_rank`).
            if len(got) == len(want) - 1 and want[-1] in (1, None):
                got = got + (1,)
            elif len(got) == len(want) + 1 and got[-1] == 1:
                got = got[:-1]
            if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                refuse(f"an input of feature shape {got} where the model takes {want}")

    def _check_label_layout(self, task, y, which):
        """Refuses one-hot labels given to a sparse categorical loss (which takes class
        ids), naming the task and the two fixes."""
        if self._label_limit() is None or isinstance(y, (dict, list, tuple)):
            return
        out_rank = len(self.model.outputs[0].shape)
        shape = np.shape(y)
        if len(shape) == out_rank and shape[-1] not in (1, None):
            raise ValueError(
                f"Task '{getattr(task, 'name', 'task')}': its {which} labels have shape "
                f"{shape}, one value per class (one-hot), but the sparse categorical loss "
                "takes one class id per example. Use loss='categorical_crossentropy', or "
                "give class ids (y = np.argmax(y, axis=-1))."
            )

    def _check_label_shapes(self, task, y, which):
        """Refuses labels whose shape would broadcast against the model's outputs in an
        element-wise Keras loss (`warpkeras._losses.TaskLoss.check_shapes`), naming the
        task. Checked here, on concrete arrays, because the compiled steps may be traced
        with unknown dimensions."""
        if not hasattr(self.loss, "check_shapes"):
            return
        try:
            outputs = self.model.output
        except (AttributeError, ValueError):
            outputs = getattr(self.model, "outputs", None)
            if not outputs:
                return
            outputs = outputs[0] if len(outputs) == 1 else list(outputs)
        y = tf.nest.map_structure(lambda t: np.asarray(t) if not hasattr(t, "shape") else t, y)
        self.loss.check_shapes(
            y, outputs, where=f"Task '{getattr(task, 'name', 'task')}': its {which} data"
        )

    def _checked(self, task, batches, which):
        """`batches` (an iterator of ``(x, y)`` or ``(x, y, sample_weight)``) as
        ``(x, y)`` / ``(x, Targets(y, sample_weight))`` batches (the step functions'
        form), its first batch's inputs checked by `_check_inputs` and label layout by
        `_check_label_layout`, and every label batch by `_check_labels`."""
        limit = self._label_limit()
        name = getattr(task, "name", "task")
        # A custom meta loss reads its own meta-batch structure (e.g. ``(x, y, t)`` with a
        # step index t): its batches are passed on as they are.
        own = which == "meta" and any(
            getattr(o, "meta_loss", None) is not None
            for o in getattr(self, "objectives", None) or ()
        )

        def checked():
            first, count = True, 0
            for batch in batches:
                count += 1
                if own:
                    yield batch
                    continue
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise ValueError(
                        f"Task '{name}': its {which} data yields "
                        f"{_v.describe(batch)}; a batch must be (x, y) or "
                        "(x, y, sample_weight), as keras.Model.fit takes them."
                    )
                batch = join_batch(batch)
                labels, _ = split_targets(batch[1])
                if first:
                    self._check_inputs(task, batch[0], which)
                    self._check_label_layout(task, labels, which)
                    self._check_label_shapes(task, labels, which)
                    first = False
                if limit is not None:
                    self._check_labels(task, labels, which)
                yield batch
            # a generator (or finite iterable) of batches ran out: name it, instead of the
            # bare StopIteration that would end a loop somewhere else without a word
            raise TaskDataExhaustedError(
                f"Task '{getattr(task, 'name', 'task')}': its {which} batches ran out after "
                f"{count} batch(es). Adaptation and meta batches are read as an endless "
                "stream: make the task's generator loop forever (e.g. `while True:` around "
                "its `yield`s), or give arrays or a tf.data.Dataset, which are repeated."
            )

        return checked()

    def _checked_streams(self, task, streams):
        """`Task.streams` output with both iterators label-checked."""
        train, meta = streams
        return self._checked(task, train, "train"), self._checked(task, meta, "meta")

    checked, checked_streams = _checked, _checked_streams
