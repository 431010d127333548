"""The meta-training engine shared by every trainer.

`MetaTrainer` composes two independent pieces (WarpGrad App. D, Eq. 8: J = L(φ) + λC(θ0)):

* a **warp objective** L(φ), meta-learning the warp variables, in one of three modes:
  ``"online"`` (Algorithm 1), ``"offline"`` (Algorithm 2, replay buffer) or
  ``"continual"`` (Algorithm 3); exact or approximate (Eq. 3 with the inner gradient
  stopped);
* an **initialisation objective** C(θ0) with weight λ: ``"leap"`` (pull-forward, Leap
  Eq. 8 / WarpGrad Eq. 12), ``"maml"`` / ``"fomaml"`` (Eq. 1, second / first order) or
  ``"reptile"``; `None` keeps θ0 fixed (as in the continual-learning experiment).

Warp-Leap is ``warp_mode="offline", init_objective="leap"``; Warp-MAML is
``warp_mode="online", init_objective="maml"``; Leap, MAML and Reptile have no warp mode.
The public trainers (`WarpTrainer`, `LeapTrainer`, `MAMLTrainer`, ...) are thin, documented
front-ends that choose these pieces.

Everything per step runs in `tf.function`s compiled once per trainer (no retracing per step
or per task as long as batch shapes stay the same). Randomness is derived from
``(seed, meta_step)``, so a run resumed from a checkpoint replays exactly the tasks and
batches the uninterrupted run would have seen.
"""

import contextlib
import copy
import functools
import math
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras._losses import loss_settings
from warpkeras import _validation as _v
from warpkeras import objectives as obj
from warpkeras.buffer import ReplayBuffer
from warpkeras.partition import UNTAGGED_POLICIES, Partition, check_exact
from warpkeras.tasks import Task, as_task, as_task_source
from warpkeras.trainers.loop import TrainingLoop
from warpkeras.trainers.parallel import PARALLEL_MODES, make_executor


def _owning_strategy(strategy, partition):
    """`strategy` when the model's variables were created in its scope, else None."""
    if strategy is None:
        return None
    variables = (partition.task_variables + partition.warp_variables
                 + partition.state_variables)
    if any(strategy.extended.variable_created_in_scope(getattr(v, "value", v))
           for v in variables):
        return strategy
    return None


WARP_MODES = (None, "online", "offline", "continual")
WARP_OBJECTIVES = ("exact", "approx")
INIT_OBJECTIVES = (None, "leap", "maml", "fomaml", "reptile")


class MetaTrainingError(ValueError):
    """A trainer was configured in a way that cannot work."""


def _resolve_loss(loss, where="MetaTrainer"):
    expected = ("a Keras loss name (e.g. loss='sparse_categorical_crossentropy' or "
                "loss='mse'), a serialised Keras loss, or a callable fn(y_true, y_pred)")
    if loss is None:
        raise MetaTrainingError(f"{where}: a loss is required: {expected}.")
    if isinstance(loss, (str, dict)):
        try:
            # Keras' deserialisation edits the dict it is given: hand it a copy.
            resolved = (keras.losses.get(loss) if isinstance(loss, str)
                        else keras.losses.deserialize(copy.deepcopy(loss)))
        except (ValueError, TypeError, KeyError) as e:
            raise MetaTrainingError(
                f"{where}: loss={_v.describe(loss)} is not valid: expected {expected} "
                f"(Keras could not read it: {e})."
            ) from None
        if resolved is None or not callable(resolved):
            raise MetaTrainingError(
                f"{where}: loss={_v.describe(loss)} is not valid: expected {expected}.")
        return resolved
    if not callable(loss):
        raise TypeError(f"{where}: loss={_v.describe(loss)} is not valid: expected {expected}.")
    return loss


def _check_head_layers(head_layers, where):
    """`head_layers` as a list of Keras layers (a single layer is wrapped), or `None`."""
    if head_layers is None:
        return None
    if isinstance(head_layers, keras.layers.Layer):
        return [head_layers]
    if (not isinstance(head_layers, (list, tuple))
            or not all(isinstance(h, keras.layers.Layer) for h in head_layers)):
        raise TypeError(
            f"{where}: head_layers={_v.describe(head_layers)} is not valid: expected a list "
            "of the model's Keras layers forming the head, e.g. "
            "head_layers=[model.layers[-1]]."
        )
    return list(head_layers)


def _loss_is_classification(loss):
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "")
    return "categorical" in str(name) or "crossentropy" in str(name)


def accuracy_function(loss, y_true, y_pred):
    """The Keras accuracy function matched to `loss` for these labels and predictions.

    Binary cross-entropies (``binary_crossentropy``, ``binary_focal_crossentropy``) use
    `keras.metrics.binary_accuracy`, thresholding probabilities at 0.5 or, with
    ``from_logits=True``, logits at 0 (the same decision); categorical and sparse
    categorical cross-entropies use `keras.metrics.categorical_accuracy` /
    `keras.metrics.sparse_categorical_accuracy`. Any other loss gets the metric that Keras's
    ``compile(metrics=["accuracy"])`` picks from the label and prediction shapes
    (`keras.src.trainers.compile_utils.is_binary_or_sparse_categorical`).

    Args:
        loss: the task loss (Keras loss object, function or name-resolved function).
        y_true: labels (a tensor with a static rank).
        y_pred: predictions (a tensor with a static rank).

    Returns:
        ``fn(y_true, y_pred) -> matches`` (per example or per element, Keras floatx).
    """
    from keras.src.trainers.compile_utils import is_binary_or_sparse_categorical

    name, from_logits = loss_settings(loss)
    if "binary" in name:
        return functools.partial(keras.metrics.binary_accuracy,
                                 threshold=0.0 if from_logits else 0.5)
    if "sparse_categorical" in name:
        return keras.metrics.sparse_categorical_accuracy
    if "categorical" in name:
        return keras.metrics.categorical_accuracy
    is_binary, is_sparse = is_binary_or_sparse_categorical(y_true, y_pred)
    if is_binary:
        return keras.metrics.binary_accuracy
    return (keras.metrics.sparse_categorical_accuracy if is_sparse
            else keras.metrics.categorical_accuracy)


def _accuracy(y_true, y_pred, loss=None):
    """Mean accuracy (float32 scalar) of a batch, with the Keras metric matched to `loss`
    (see `accuracy_function`); the mean over the outputs of a multi-output model. Stateless
    and traceable (runs inside the compiled step functions)."""
    trues, preds = tf.nest.flatten(y_true), tf.nest.flatten(y_pred)
    if len(trues) != len(preds):
        raise ValueError(
            f"Accuracy needs one label per model output: the labels have {len(trues)} "
            f"part(s), the outputs {len(preds)}; pass accuracy=False to the trainer to turn "
            "it off."
        )
    values = []
    for t, p in zip(trues, preds):
        p = tf.convert_to_tensor(p)
        if p.dtype in (tf.float16, tf.bfloat16):
            p = tf.cast(p, tf.float32)
        t = tf.convert_to_tensor(t)
        matches = accuracy_function(loss, t, p)(t, p)
        values.append(tf.reduce_mean(tf.cast(matches, tf.float32)))
    return tf.add_n(values) / float(len(values))


def _all_finite(tensors):
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


class _Packer:
    """Packs a list of tensors into one flat tensor per dtype, and back.

    Compiled steps take and return θ, momentum and state packed this way: a handful of
    arguments instead of one per variable keeps the cost of calling a `tf.function` small
    next to the step itself.
    """

    def __init__(self, variables):
        self.shapes = [tuple(v.shape) for v in variables]
        self.dtypes = [tf.as_dtype(v.dtype) for v in variables]
        self.groups = []
        for d in self.dtypes:
            if d not in self.groups:
                self.groups.append(d)
        self.index = [[i for i, d in enumerate(self.dtypes) if d == g] for g in self.groups]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def pack(self, values):
        values = list(values)
        return tuple(
            tf.concat([tf.reshape(values[i], [-1]) for i in idx], axis=0) for idx in self.index
        )

    def unpack(self, packed):
        out = [None] * len(self.shapes)
        for flat, idx in zip(packed, self.index):
            pieces = tf.split(flat, [self.sizes[i] for i in idx]) if len(idx) > 1 else [flat]
            for i, piece in zip(idx, pieces):
                out[i] = tf.reshape(piece, self.shapes[i])
        return out


class MetaTrainer(TrainingLoop):
    """Meta-trains warp parameters φ and/or an initialisation θ0 of a tagged Keras model.

    Prefer the front-ends: `WarpTrainer` (WarpGrad, Warp-Leap, Warp-MAML), `LeapTrainer`,
    `MAMLTrainer`, `ReptileTrainer`, `FineTuneTrainer`, `NoMetaTrainer`. All share this
    constructor's arguments.

    **Batch-norm statistics.** One rule for every batch-norm layer (Keras'
    `BatchNormalization` and `warpkeras.layers.ExactBatchNormalization`, in task, warp or
    frozen layers; a layer with ``trainable=False`` always uses its moving statistics and
    keeps them): *the moving statistics are the training data's statistics at the
    parameters they are used with.*

    * *Adaptation* (the inner loop of `fit`, `adapt`, `evaluate`) always runs in training
      mode: each step normalises with its own batch's statistics.
    * *Saved statistics (θ0)*: after every meta step the moving mean and variance are set
      to the batch statistics at θ0 of each task's first training batch, averaged over the
      meta-batch's tasks (tasks dropped as non-finite excluded). They come from data from
      the first meta step on, whatever the layers' momentum (`FineTuneTrainer`: at the
      pre-trained parameters; MAML: at θ0 on the support batches). `NoMetaTrainer`
      does not train and leaves them unchanged.
    * *Adapted parameters (θ_k, k ≥ 1)*: the statistics of the task's latest adaptation
      batch at θ_k (one training-mode pass with momentum 0,
      `warpkeras.export.batch_statistics`).
    * *Evaluation* (`evaluate`'s test losses) runs in `eval_training_mode`: True (the
      default, the papers' reference code) normalises with the evaluated batch's own
      statistics (transductive); False uses the moving statistics above, as a model
      deployed one example at a time must.
    * *Export*: `export` adapts in training mode and predicts in `eval_training_mode`,
      and its ``adapt_and_predict`` uses the same statistics, so the served predictions
      equal `evaluate`'s (see `warpkeras.export_adaptive`).

    Args:
        model: a built `keras.Model` with layers tagged by `warpkeras.warp` /
            `warpkeras.task` (see `warpkeras.partition`).
        loss: the task loss (a Keras loss name or object, or ``fn(y_true, y_pred)``); also
            the meta loss unless `meta_loss` is given.
        warp_mode: ``None``, ``"online"``, ``"offline"`` or ``"continual"``.
        warp_objective: ``"exact"`` (second order through the inner step) or ``"approx"``.
        init_objective: ``None``, ``"leap"``, ``"maml"``, ``"fomaml"`` or ``"reptile"``.
        init_weight: λ in J = L(φ) + λC(θ0): scales the θ0 meta-gradient.
        inner_learning_rate: α of the inner SGD.
        inner_momentum: μ of heavy-ball momentum in the inner loop, or `None`.
        learn_inner_learning_rate: meta-learn α (a scalar, WarpGrad App. G "learned α");
            needs a warp mode with the exact objective to have a gradient.
        learn_inner_momentum: meta-learn μ likewise.
        hyper_learning_rate: SGD step for learned α / μ; their meta-gradients are clipped
            at `hyper_clip` (App. G: both 0.001).
        hyper_clip: clip value of the α / μ meta-gradients.
        inner_steps: K, adaptation steps per task during meta-training.
        meta_batch_size: tasks per meta step.
        meta_optimizer: Keras optimizer for φ (default SGD(0.1)).
        init_optimizer: Keras optimizer for θ0 (default: a copy of `meta_optimizer`).
        meta_interval: η: offline, points per warp update (default 1... see
            `WarpTrainer`); continual, inner steps per warp update.
        max_warp_updates: offline, cap on warp updates per meta step (`None`: one per η
            stored points, i.e. every point used once).
        warp_gradient_reduction: ``"mean"`` (default) or ``"sum"``: how the N warp
            meta-gradients ∇φ L(φ; θ) (and those of a learned α / μ) that make one warp
            update are combined. WarpGrad Algorithms 1–3 *sum* them (g_φ ← g_φ + ∇L(φ; θ),
            then φ ← φ − β g_φ): ``"sum"`` is the paper's choice. ``"mean"`` divides that
            sum by N, where N is: online, K × the tasks of the meta-batch that stayed
            finite (Algorithm 1 lines 5–13); offline, the points of the mini-batch (η;
            fewer for the last mini-batch of a meta step or where non-finite points were
            skipped; Algorithm 2 lines 15–19); continual, η (Algorithm 3). With a
            `keras.optimizers.SGD` meta optimizer, ``"mean"`` with learning rate β is
            exactly ``"sum"`` with β / N; with Adam / RMSprop, which are invariant to a
            constant scale of the gradient, the two differ only through ε. The default
            stays ``"mean"`` so that a tuned meta learning rate does not depend on K,
            η or the meta-batch size.
        buffer_final_point: offline, also store each task's final θ_K (with its momentum
            buffer), so that the buffer holds θ_0 … θ_K, K + 1 points per task, as in
            WarpGrad Algorithm 2 (line 4 starts each task's list with θ_0, line 9 appends
            θ_{k+1} for k = 0 … K − 1). Default True, the paper's choice. Every stored
            point's warp gradient is ∇φ of Eq. 3 at that point, i.e. of
            L_meta(θ − α∇L_task(θ; φ); φ), through one inner step from it on a fresh
            training batch; for θ_K that step is one more than the adaptation took: Eq. 3
            treats θ_K as one more Monte-Carlo sample of p(θ | τ), and Algorithm 2 line 15
            draws it like every other point. False stores θ_0 … θ_{K−1} only, the points
            whose step the adaptation took (the sum of Algorithm 1, and the behaviour of
            warpkeras before this option).
        buffer_capacity, buffer_overflow, buffer_spill_dir: bound the offline replay
            buffer (see `warpkeras.ReplayBuffer`).
        leap_norm: ``"length"`` (WarpGrad Eq. 9/12, the reference default) or
            ``"energy"`` (Leap Eq. 7/8).
        leap_sign_correction: Leap App. C stabiliser.
        leap_loss_in_path: include L(θ) as a coordinate of the path.
        meta_loss: optional ``meta_loss(partition, loss_fn, theta, phi, meta_batch, state)
            -> scalar`` replacing the loss on the meta batch (e.g. the continual objective).
        accuracy: report accuracy (`None`: when the loss is a cross-entropy).
        head_layers: layers forming the task head; for multi-headed evaluation their
            values are re-initialised for every evaluation task (see `FineTuneTrainer`).
        untagged: role of untagged trainable layers (`warpkeras.partition`).
        eval_training_mode: run evaluation forward passes in training mode (batch-norm
            uses batch statistics, as in the papers' reference code). Default True. See
            "Batch-norm statistics" above.
        jit_compile: compile the step functions with XLA.
        parallel: how the tasks of a meta-batch are adapted: ``"sequential"`` (one after
            another), ``"unrolled"`` (all in one graph) or ``"vectorized"``
            (`tf.vectorized_map`); see `warpkeras.trainers.parallel`.
        group_size: with ``parallel="unrolled"`` / ``"vectorized"``, the number of tasks
            adapted together in one call (a positive int); `None` (default): the whole
            meta-batch. Smaller groups bound the memory of large meta-batches.
        strategy: a `tf.distribute.Strategy` to split each meta-batch across replicas
            (`meta_batch_size` must be a multiple of the replica count).
        seed: seed of task sampling, batches and random layers: the draws of `Dropout`
            and other layers with a `keras.random.SeedGenerator` derive from (seed,
            meta step, task), and go on from forward pass to forward pass.

    Raises:
        TypeError: an argument of the wrong type (``inner_steps="five"``,
            ``seed="abc"``, ``jit_compile=1``, an optimizer class instead of an instance,
            a `model` that is not a `keras.Model`, ...). The message names the trainer,
            the argument, the value and what to pass instead.
        MetaTrainingError: (a `ValueError`) a value out of range or an unknown choice
            (``inner_learning_rate`` <= 0, NaN or infinite; ``inner_momentum`` outside
            [0, 1); ``inner_steps < 1``; an unknown optimizer name or mode; a
            `buffer_spill_dir` naming a file; ...) or a combination that cannot work.
        ValueError: during training and evaluation with a sparse categorical loss, a
            batch whose class ids lie outside [0, C) of the model's C-unit output (the
            message names the task and the range).

    Optimizers (`meta_optimizer`, `init_optimizer`) are given in any form
    `keras.optimizers.get` accepts: an instance, a name (``"adam"``) or a serialised
    config.
    """

    _default_warp_mode = None
    _default_init_objective = None

    def __init__(
        self,
        model,
        loss,
        *,
        warp_mode=None,
        warp_objective="exact",
        init_objective=None,
        init_weight=1.0,
        inner_learning_rate=0.1,
        inner_momentum=None,
        learn_inner_learning_rate=False,
        learn_inner_momentum=False,
        hyper_learning_rate=1e-3,
        hyper_clip=1e-3,
        inner_steps=100,
        meta_batch_size=5,
        meta_optimizer=None,
        init_optimizer=None,
        meta_interval=None,
        max_warp_updates=None,
        warp_gradient_reduction="mean",
        buffer_final_point=True,
        buffer_capacity=None,
        buffer_overflow="reservoir",
        buffer_spill_dir=None,
        leap_norm="length",
        leap_sign_correction=True,
        leap_loss_in_path=True,
        meta_loss=None,
        accuracy=None,
        head_layers=None,
        untagged="task",
        eval_training_mode=True,
        jit_compile=False,
        parallel="sequential",
        strategy=None,
        seed=0,
        group_size=None,
    ):
        where = type(self).__name__
        if not isinstance(model, keras.Model):
            raise TypeError(f"{where}: model={_v.describe(model)} is not valid: expected a "
                            "built keras.Model (tag layers with warpkeras.warp / warpkeras.task).")
        choice = functools.partial(_v.check_choice, where=where, error=MetaTrainingError)
        warp_mode = choice(warp_mode, "warp_mode", WARP_MODES)
        warp_objective = choice(warp_objective, "warp_objective", WARP_OBJECTIVES)
        init_objective = choice(init_objective, "init_objective", INIT_OBJECTIVES)
        leap_norm = choice(leap_norm, "leap_norm", ("length", "energy"))
        buffer_overflow = choice(buffer_overflow, "buffer_overflow", ("reservoir", "spill"))
        warp_gradient_reduction = choice(warp_gradient_reduction, "warp_gradient_reduction",
                                         ("mean", "sum"))
        untagged = choice(untagged, "untagged", UNTAGGED_POLICIES)
        parallel = choice(parallel, "parallel", PARALLEL_MODES)
        flag = functools.partial(_v.check_bool, where=where)
        learn_inner_learning_rate = flag(learn_inner_learning_rate, "learn_inner_learning_rate")
        learn_inner_momentum = flag(learn_inner_momentum, "learn_inner_momentum")
        leap_sign_correction = flag(leap_sign_correction, "leap_sign_correction")
        leap_loss_in_path = flag(leap_loss_in_path, "leap_loss_in_path")
        buffer_final_point = flag(buffer_final_point, "buffer_final_point")
        accuracy = flag(accuracy, "accuracy", allow_none=True)
        eval_training_mode = flag(eval_training_mode, "eval_training_mode")
        jit_compile = flag(jit_compile, "jit_compile")
        integer = functools.partial(_v.check_int, where=where, error=MetaTrainingError)
        inner_steps = integer(inner_steps, "inner_steps", minimum=1, example=5)
        meta_batch_size = integer(meta_batch_size, "meta_batch_size", minimum=1, example=5)
        meta_interval = integer(meta_interval, "meta_interval", minimum=1, allow_none=True)
        max_warp_updates = integer(max_warp_updates, "max_warp_updates", minimum=1,
                                   allow_none=True, example=100)
        buffer_capacity = integer(buffer_capacity, "buffer_capacity", minimum=1,
                                  allow_none=True, example=1000)
        group_size = integer(group_size, "group_size", minimum=1, allow_none=True, example=4)
        seed = _v.check_seed(seed, "seed", where=where, error=MetaTrainingError)
        number = functools.partial(_v.check_float, where=where, error=MetaTrainingError)
        inner_learning_rate = number(
            inner_learning_rate, "inner_learning_rate", minimum=0.0, min_inclusive=False,
            example=0.1)
        inner_momentum = number(inner_momentum, "inner_momentum", minimum=0.0, maximum=1.0,
                                max_inclusive=False, allow_none=True, example=0.9)
        init_weight = number(init_weight, "init_weight", minimum=0.0, example=1.0)
        hyper_learning_rate = number(hyper_learning_rate, "hyper_learning_rate", minimum=0.0,
                                     example=1e-3)
        hyper_clip = number(hyper_clip, "hyper_clip", minimum=0.0, min_inclusive=False,
                            allow_none=True, example=1e-3)
        meta_optimizer = _v.get_optimizer(meta_optimizer, "meta_optimizer", where=where)
        init_optimizer = _v.get_optimizer(init_optimizer, "init_optimizer", where=where)
        if (meta_optimizer is not None and meta_optimizer is init_optimizer
                and warp_mode is not None and init_objective is not None):
            raise MetaTrainingError(
                f"{where}: meta_optimizer and init_optimizer are the same optimizer instance, "
                "but φ and θ0 each need their own optimizer state: pass two instances (or "
                "leave init_optimizer=None for a copy of meta_optimizer)."
            )
        meta_loss = _v.check_callable(
            meta_loss, "meta_loss", where=where,
            signature="meta_loss(partition, loss_fn, theta, phi, meta_batch, state) -> scalar")
        head_layers = _check_head_layers(head_layers, where)
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(
                f"{where}: strategy={_v.describe(strategy)} is not valid: expected a "
                "tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) or None."
            )
        if buffer_spill_dir is not None:
            buffer_spill_dir = _v.check_directory(buffer_spill_dir, "buffer_spill_dir",
                                                  where=where, error=MetaTrainingError)
        if warp_mode == "continual" and init_objective is not None:
            raise MetaTrainingError(
                "warp_mode='continual' (Algorithm 3) adapts one stream of task parameters "
                "that is never reset, so there is no initialisation θ0 to meta-learn: use "
                f"init_objective=None (got {init_objective!r})."
            )
        if warp_mode == "offline" and init_objective in ("maml", "fomaml"):
            raise MetaTrainingError(
                "Warp-MAML uses online meta-training (WarpGrad App. D): use "
                "warp_mode='online' with init_objective='maml'."
            )
        if (learn_inner_learning_rate or learn_inner_momentum) and warp_mode is None:
            raise MetaTrainingError(
                "A meta-learned inner learning rate or momentum is trained through the warp "
                "objective: set a warp_mode."
            )
        if learn_inner_momentum and inner_momentum is None:
            raise MetaTrainingError(
                f"{where}: learn_inner_momentum=True needs an inner_momentum value to start "
                "from, e.g. inner_momentum=0.9.")
        if (learn_inner_learning_rate or learn_inner_momentum) and warp_objective != "exact":
            raise MetaTrainingError(
                "With the approximate objective the inner update is a constant, so the "
                "learning rate and momentum get no meta-gradient: use warp_objective='exact'."
            )
        if (
            warp_mode == "offline"
            and meta_interval is not None
            and buffer_capacity is not None
            and int(meta_interval) > int(buffer_capacity)
            and buffer_overflow == "reservoir"
        ):
            raise MetaTrainingError(
                f"meta_interval (η={meta_interval}) is larger than the replay buffer "
                f"(capacity {buffer_capacity}): no warp update could ever be formed."
            )

        self.model = model
        self.partition = Partition(model, untagged=untagged, require_warp=warp_mode is not None)
        for why, second_order in (
            ("warp_objective='exact'", warp_mode is not None and warp_objective == "exact"),
            ("init_objective='maml'", init_objective == "maml"),
        ):
            if second_order:
                check_exact(model, why, error=MetaTrainingError)
        self.loss = _resolve_loss(loss, where)
        self.warp_mode = warp_mode
        self.exact = warp_objective == "exact"
        self.warp_objective = warp_objective
        self.init_objective = init_objective
        self.init_weight = float(init_weight)
        self.inner_steps = int(inner_steps)
        self.meta_batch_size = int(meta_batch_size)
        self.meta_interval = int(meta_interval) if meta_interval is not None else None
        self.max_warp_updates = max_warp_updates
        self.warp_gradient_reduction = warp_gradient_reduction
        self.buffer_final_point = bool(buffer_final_point)
        self.leap_norm = leap_norm
        self.leap_sign_correction = bool(leap_sign_correction)
        self.leap_loss_in_path = bool(leap_loss_in_path)
        self.meta_loss = meta_loss
        self.accuracy = _loss_is_classification(self.loss) if accuracy is None else bool(accuracy)
        self.eval_training_mode = bool(eval_training_mode)
        self.jit_compile = bool(jit_compile)
        self.seed = int(seed)
        if warp_mode == "continual" and (parallel != "sequential" or strategy is not None):
            raise MetaTrainingError(
                "warp_mode='continual' adapts one stream of task parameters: it runs "
                "sequentially (parallel='sequential', no strategy)."
            )
        try:
            self.executor = make_executor(parallel, strategy, jit_compile=self.jit_compile,
                                          group_size=group_size)
        except ValueError as e:
            raise MetaTrainingError(f"{where}: {e}") from None
        if strategy is not None:
            self.executor.group_size(self.meta_batch_size)
        self.buffer = (
            ReplayBuffer(buffer_capacity, buffer_overflow, buffer_spill_dir, seed=seed)
            if warp_mode == "offline"
            else None
        )

        # Trainer variables and optimiser slots live where the model's variables live: a
        # model built under `strategy.scope()` gets mirrored slots (and vice versa).
        self._variables_strategy = _owning_strategy(strategy, self.partition)
        with (self._variables_strategy.scope() if self._variables_strategy
              else contextlib.nullcontext()):
            dtype = self.partition.task_variables[0].dtype
            self.learn_lr = bool(learn_inner_learning_rate)
            self.learn_mu = bool(learn_inner_momentum)
            self.inner_lr = tf.Variable(float(inner_learning_rate), dtype=dtype, trainable=False,
                                        name="inner_learning_rate")
            self.use_momentum = inner_momentum is not None
            self.inner_mu = tf.Variable(float(inner_momentum or 0.0), dtype=dtype, trainable=False,
                                        name="inner_momentum")

            # Optimisers (built now so that checkpoints can be restored into them).
            self.meta_optimizer = (meta_optimizer if meta_optimizer is not None
                                   else keras.optimizers.SGD(0.1))
            if init_optimizer is None:
                init_optimizer = self.meta_optimizer.__class__.from_config(
                    self.meta_optimizer.get_config()
                )
            self.init_optimizer = init_optimizer
            self.hyper_optimizer = keras.optimizers.SGD(hyper_learning_rate, clipvalue=hyper_clip)
            if self.partition.warp_variables and warp_mode is not None:
                self.meta_optimizer.build(self.partition.warp_variables)
            if self._learns_init():
                self.init_optimizer.build(self.partition.task_variables)
            self._hyper_vars = [v for v, on in ((self.inner_lr, self.learn_lr),
                                                (self.inner_mu, self.learn_mu)) if on]
            if self._hyper_vars:
                self.hyper_optimizer.build(self._hyper_vars)

            # Heads (multi-headed evaluation): indices into the task list.
            self.head_indices = []
            if head_layers:
                head_ids = {id(v) for layer in head_layers for v in layer.trainable_variables}
                self.head_indices = [
                    i for i, v in enumerate(self.partition.task_variables) if id(v) in head_ids
                ]
                if not self.head_indices:
                    raise MetaTrainingError("head_layers hold no task variables of the model.")
            self._initial_head = [
                tf.identity(self.partition.task_variables[i].value) for i in self.head_indices
            ]

            # Continual mode: accumulated warp gradient and counter survive across meta steps.
            self._stream_acc = [
                tf.Variable(tf.zeros_like(v.value), trainable=False)
                for v in self.partition.warp_variables
            ] if warp_mode == "continual" else []
            self._stream_count = tf.Variable(0, dtype=tf.int64, trainable=False)

            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="meta_step")
            self.nan_tasks = tf.Variable(0, dtype=tf.int64, trainable=False, name="nan_tasks")
            self.history = None
            self.stop_training = False
            self._build_functions()

    # ------------------------------------------------------------------------------------
    # configuration helpers
    def _learns_init(self):
        return self.init_objective is not None

    def get_config(self):
        """The trainer's hyper-parameters (for logs and results files)."""
        return {
            "class": type(self).__name__,
            "warp_mode": self.warp_mode,
            "warp_objective": self.warp_objective if self.warp_mode else None,
            "init_objective": self.init_objective,
            "init_weight": self.init_weight,
            "inner_learning_rate": float(self.inner_lr.numpy()),
            "inner_momentum": float(self.inner_mu.numpy()) if self.use_momentum else None,
            "inner_steps": self.inner_steps,
            "meta_batch_size": self.meta_batch_size,
            "meta_interval": self.meta_interval,
            "warp_gradient_reduction": self.warp_gradient_reduction,
            "buffer_final_point": self.buffer_final_point if self.warp_mode == "offline" else None,
            "leap_norm": self.leap_norm,
            "seed": self.seed,
            "meta_optimizer": keras.optimizers.serialize(self.meta_optimizer),
        }

    # ------------------------------------------------------------------------------------
    # compiled pieces
    def _phi(self):
        return [v.value for v in self.partition.warp_variables]

    def _theta0(self):
        return [v.value for v in self.partition.task_variables]

    def _mu(self):
        return self.inner_mu if self.use_momentum else None

    def _warp_scale(self, n):
        """The factor applied to a sum of `n` warp meta-gradients before one warp update:
        1 / n for ``warp_gradient_reduction="mean"``, 1 for ``"sum"`` (Algorithms 1–3)."""
        return 1.0 / float(n) if self.warp_gradient_reduction == "mean" else 1.0

    def _meta_value(self, theta, phi, meta_batch, state):
        """L_meta at θ and the model state after its forward pass."""
        if self.meta_loss is not None:
            return (self.meta_loss(self.partition, self.loss, theta, phi, meta_batch, state),
                    state)
        return obj.task_loss(self.partition, self.loss, theta, phi, meta_batch, state)

    def _with_seeds(self, state, source):
        """`state` with the random-number-generator states taken from `source`."""
        state = list(state)
        for i in self.partition.seed_indices:
            state[i] = source[i]
        return state

    def _reseed(self, packed_state, *key):
        """A packed state whose generator states derive from ``(seed,) + key``; every
        forward pass after it draws fresh random values (see `Partition.reseed`)."""
        if not self.partition.seed_indices:
            return packed_state
        sp = self._state_packer
        return sp.pack(self.partition.reseed(sp.unpack(packed_state), (self.seed,) + key))

    def _reseed_stacked(self, stacked_state, keys):
        """`_reseed` for a group: one key per task along the leading axis."""
        if not self.partition.seed_indices:
            return stacked_state
        per_task = [self._reseed(tuple(t[g] for t in stacked_state), *key)
                    for g, key in enumerate(keys)]
        return tuple(tf.stack(parts) for parts in zip(*per_task))

    def _metric(self, y, outputs):
        if self.accuracy:
            return _accuracy(y, outputs, self.loss)
        return tf.constant(0.0)

    def _build_functions(self):
        p, loss_fn = self.partition, self.loss
        self.trace_counts = {}
        self._theta_packer = _Packer(self.partition.task_variables)
        self._phi_packer = _Packer(self.partition.warp_variables)
        self._state_packer = _Packer(self.partition.state_variables)
        tp, pp, sp = self._theta_packer, self._phi_packer, self._state_packer

        def traced(name):
            def on_trace():
                self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
            return on_trace

        def hyper_sources():
            lr = tf.identity(self.inner_lr)
            mu = tf.identity(self.inner_mu) if self.use_momentum else None
            return lr, mu

        def run_step(theta, velocity, state, x, y, meta_batch, warp):
            """One inner step at packed θ_k; with `warp`, also ∇φ (and ∇α, ∇μ) of Eq. 3."""
            phi = self._phi()
            theta_l = [tf.stop_gradient(t) for t in tp.unpack(theta)]
            velocity_l = ([tf.stop_gradient(v) for v in tp.unpack(velocity)]
                          if self.use_momentum else None)
            state_l = sp.unpack(state)
            lr, mu = hyper_sources()
            if not warp:
                step = obj.task_step(p, loss_fn, theta_l, phi, (x, y), lr, momentum=mu,
                                     velocity=velocity_l, state=state_l)
                return step, None, None, None
            with tf.GradientTape() as tape:
                tape.watch(phi)
                tape.watch(lr)
                if mu is not None:
                    tape.watch(mu)
                step = obj.task_step(p, loss_fn, theta_l, phi, (x, y), lr, momentum=mu,
                                     velocity=velocity_l, state=state_l,
                                     stop_inner_gradient=not self.exact)
                # The meta pass continues from the inner pass's state (fresh dropout masks).
                meta, meta_state = self._meta_value(
                    step.theta, phi, meta_batch, [tf.stop_gradient(s) for s in step.state])
            step = step._replace(state=self._with_seeds(step.state, meta_state))
            sources = [phi, lr] + ([mu] if mu is not None else [])
            grads = tape.gradient(meta, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            hyper = [g for g, on in zip(grads[1:], (self.learn_lr, self.learn_mu)) if on]
            hyper = tf.stack(hyper) if hyper else tf.zeros([0], lr.dtype)
            return step, meta, pp.pack(grads[0]), hyper

        leap = self.init_objective == "leap"
        online_warp = self.warp_mode in ("online", "continual")

        def leap_increment(prev_theta, theta, prev_loss, loss, prev_grad):
            return obj.leap_meta_gradient(
                list(prev_theta), list(theta), prev_loss, loss, list(prev_grad),
                norm=self.leap_norm, sign_correction=self.leap_sign_correction,
                loss_in_path=self.leap_loss_in_path)

        def meta_step_fn(carry, x, y, meta_batch):
            """One adaptation step of one task during meta-training, carrying everything the
            objectives accumulate (all parameters packed into one flat tensor per dtype)."""
            step, meta, g_phi, g_hyper = run_step(carry["theta"], carry.get("velocity"),
                                                  carry["state"], x, y, meta_batch, online_warp)
            new = dict(carry)
            new["theta"] = tp.pack([tf.stop_gradient(t) for t in step.theta])
            if self.use_momentum:
                new["velocity"] = tp.pack([tf.stop_gradient(v) for v in step.velocity])
            new["state"] = sp.pack(step.state)
            grads = tp.pack([tf.stop_gradient(g) for g in step.gradients])
            finite = tf.logical_and(tf.math.is_finite(step.loss),
                                    tf.reduce_all([_all_finite(grads)]))
            out = {"loss": step.loss, "metric": self._metric(y, step.outputs)}
            if online_warp:
                finite = tf.logical_and(finite, tf.math.is_finite(meta))
                finite = tf.logical_and(finite, _all_finite(g_phi))
                out["meta"] = meta
                if self.warp_mode == "online":
                    new["warp_acc"] = tuple(a + g for a, g in zip(carry["warp_acc"], g_phi))
                    new["hyper_acc"] = carry["hyper_acc"] + g_hyper
                else:
                    out["g_phi"], out["g_hyper"] = g_phi, g_hyper
            if leap:
                inc = leap_increment(carry["prev_theta"], carry["theta"], carry["prev_loss"],
                                     step.loss, carry["prev_grad"])
                new["leap"] = tuple(a + carry["has_prev"] * i for a, i in zip(carry["leap"], inc))
                new["prev_theta"], new["prev_grad"] = carry["theta"], grads
                new["prev_loss"] = step.loss
                new["has_prev"] = tf.ones_like(carry["has_prev"])
            out["finite"] = finite
            return new, out

        def leap_close_fn(carry, x, y):
            """Closes the path at θ_K with one more loss on a fresh batch (Leap's last step)."""
            loss, _ = obj.task_loss(p, loss_fn, tp.unpack(carry["theta"]), self._phi(), (x, y),
                                    sp.unpack(carry["state"]))
            inc = leap_increment(carry["prev_theta"], carry["theta"], carry["prev_loss"], loss,
                                 carry["prev_grad"])
            total = tuple(a + i for a, i in zip(carry["leap"], inc))
            return total, _all_finite(total)

        def plain_step_fn(theta, velocity, state, x, y):
            """One inner step with φ frozen (evaluation and fine-tuning)."""
            step, _, _, _ = run_step(theta, velocity, state, x, y, None, False)
            new_theta = tp.pack(step.theta)
            sq = tf.add_n([tf.reduce_sum(tf.square(a - b)) for a, b in zip(new_theta, theta)])
            finite = tf.logical_and(tf.math.is_finite(step.loss), _all_finite(step.gradients))
            return (new_theta, tp.pack(step.velocity) if self.use_momentum else velocity,
                    sp.pack(step.state), step.loss, self._metric(y, step.outputs), sq, finite)

        def warp_point_fn(theta, velocity, state, x, y, meta_batch):
            """∇φ of Eq. 3 at one stored point (offline warp updates)."""
            step, meta, g_phi, g_hyper = run_step(theta, velocity, state, x, y, meta_batch, True)
            finite = tf.logical_and(tf.math.is_finite(meta), _all_finite(g_phi))
            return meta, g_phi, g_hyper, finite

        def evaluate_point(theta, state, x, y):
            loss, _, outputs = obj.task_loss(
                p, loss_fn, tp.unpack(theta), self._phi(), (x, y), sp.unpack(state),
                self.eval_training_mode, return_outputs=True)
            return loss, self._metric(y, outputs)

        def maml_fn(theta0, state, sx, sy, qx, qy):
            loss, grads, _ = obj.maml_meta_gradient(
                p, loss_fn, tp.unpack(theta0), self._phi(), (sx, sy), (qx, qy), self.inner_lr,
                self.inner_steps, first_order=self.init_objective == "fomaml",
                state=sp.unpack(state))
            grads = tp.pack(grads)
            return loss, grads, tf.logical_and(tf.math.is_finite(loss), _all_finite(grads))

        ex = self.executor
        self._group_step = ex.compile(meta_step_fn, traced("group_step"))
        self._group_leap_close = ex.compile(leap_close_fn, traced("group_leap_close"))
        self._group_maml = ex.compile(maml_fn, traced("group_maml"))
        def single(fn, name):
            on_trace = traced(name)

            def run(*args):
                on_trace()
                return fn(*args)
            return tf.function(run, jit_compile=self.jit_compile, reduce_retracing=True)

        self._plain_step = single(plain_step_fn, "plain_step")
        self._evaluate_point = single(evaluate_point, "evaluate_point")
        self._warp_point = single(warp_point_fn, "warp_point")

        warp_vars = self.partition.warp_variables
        task_vars = self.partition.task_variables

        def apply_warp(grads):
            self.meta_optimizer.apply(pp.unpack(grads), warp_vars)

        def apply_init(grads):
            self.init_optimizer.apply([g * self.init_weight for g in tp.unpack(grads)], task_vars)

        def apply_hyper(grads):
            self.hyper_optimizer.apply(tf.unstack(grads), self._hyper_vars)
            self.inner_lr.assign(tf.maximum(self.inner_lr, 0.0))
            self.inner_mu.assign(tf.clip_by_value(self.inner_mu, 0.0, 0.999))

        strategy = self._variables_strategy
        if strategy is not None:
            # Mirrored variables are updated the way Keras' own `fit` does: the optimiser
            # runs in every replica and all-reduces (sums) the replicas' gradients. Ours are
            # already the all-reduced totals, so each replica passes its 1/replicas share.
            share = 1.0 / strategy.num_replicas_in_sync

            def in_replicas(fn):
                return lambda grads: strategy.run(
                    fn, args=(tf.nest.map_structure(lambda g: g * share, grads),))

            apply_warp, apply_init, apply_hyper = map(
                in_replicas, (apply_warp, apply_init, apply_hyper))

        self._apply_warp = tf.function(apply_warp)
        self._apply_init = tf.function(apply_init)
        self._apply_hyper = tf.function(apply_hyper)

    # ------------------------------------------------------------------------------------
    # adaptation
    def _start_values(self, task=None, head=None):
        """θ0 (with the task's head, or the initial head, for multi-headed models), zero
        momentum and the model's state, packed."""
        theta = [tf.convert_to_tensor(v) for v in self._theta0()]
        if self.head_indices:
            values = head if head is not None else self._initial_head
            for i, h in zip(self.head_indices, values):
                theta[i] = tf.convert_to_tensor(h)
        theta = self._theta_packer.pack(theta)
        velocity = tuple(tf.zeros_like(t) for t in theta) if self.use_momentum else ()
        state = self._state_packer.pack([v.value for v in self.partition.state_variables])
        return theta, velocity, state

    def _task_rngs(self, rng):
        a, b = rng.spawn(2)
        return a, b

    def _initial_carry(self, size, start=None):
        theta, velocity, state = start if start is not None else self._start_values()
        stack = lambda values: tuple(tf.stack([v] * size) for v in values)  # noqa: E731
        zeros = lambda values: tuple(tf.zeros_like(v) for v in values)  # noqa: E731
        carry = {"theta": stack(theta), "state": stack(state)}
        if self.use_momentum:
            carry["velocity"] = stack(velocity)
        if self.warp_mode == "online":
            carry["warp_acc"] = zeros(stack(self._phi_packer.pack(self._phi())))
            carry["hyper_acc"] = tf.zeros([size, len(self._hyper_vars)], theta[0].dtype)
        if self.init_objective == "leap":
            carry["leap"] = zeros(carry["theta"])
            carry["prev_theta"] = zeros(carry["theta"])
            carry["prev_grad"] = zeros(carry["theta"])
            carry["prev_loss"] = tf.zeros([size], theta[0].dtype)
            carry["has_prev"] = tf.zeros([size], theta[0].dtype)
        return carry

    @staticmethod
    def _stack_batches(batches):
        return tf.nest.map_structure(lambda *ts: np.stack([np.asarray(t) for t in ts]), *batches)

    @staticmethod
    def _batch_signature(batch):
        """Shapes and dtypes of the leaves of one task's batch structure."""
        return tuple((tuple(getattr(t, "shape", np.shape(t))), str(getattr(t, "dtype", "")))
                     for t in tf.nest.flatten(batch))

    def _by_shape(self, fn, tasks, stacked, batches):
        """``fn(*stacked, *stacked_batches)`` for a group of tasks whose batches may differ
        in shape (e.g. a 10-example and a 6-example task, or a dataset's shorter last batch).

        Tasks whose batches share shapes are stacked and run together; a group with several
        shapes runs as one sub-group per shape (in order of first appearance), each with
        its slice of `stacked` along the task axis, and the results are put back in task
        order. One shape (the usual case) is a single call.

        Args:
            fn: a group function (see `warpkeras.trainers.parallel`); every leaf of its
                result has the task axis first.
            tasks: the group's tasks (for error messages).
            stacked: a tuple of structures with a leading task axis.
            batches: a list of per-task lists of batch structures (one list per batch
                argument of `fn`).

        Raises:
            ValueError: the shapes differ under a `tf.distribute.Strategy`, whose replicas
                need equal shares of equally shaped tasks; the message names the tasks and
                their shapes.
        """
        size = len(tasks)
        if size == 1:
            return fn(*stacked, *[self._stack_batches(arg) for arg in batches])
        signatures = [tuple(self._batch_signature(arg[i]) for arg in batches)
                      for i in range(size)]
        groups = {}
        for i, sig in enumerate(signatures):
            groups.setdefault(sig, []).append(i)
        if len(groups) == 1:
            return fn(*stacked, *[self._stack_batches(arg) for arg in batches])
        if getattr(self.executor, "name", "") == "distributed":
            shapes = "; ".join(
                f"'{getattr(tasks[i], 'name', i)}': "
                + ", ".join(str(list(shape)) for arg in signatures[i] for shape, _ in arg)
                for i in range(size))
            raise ValueError(
                "The tasks of a meta-batch split across a tf.distribute.Strategy must have "
                f"batches of one shape, but they differ: {shapes}. Give every task the same "
                "batch_size (at most the smallest task's number of examples, and "
                "drop_remainder=True for tf.data batches), or train without a strategy "
                "(parallel='unrolled' / 'vectorized' group the tasks by shape)."
            )
        outs, order = [], []
        for idx in groups.values():
            part = tf.nest.map_structure(lambda t: tf.gather(t, idx), stacked)
            outs.append(fn(*part, *[self._stack_batches([arg[i] for i in idx])
                                    for arg in batches]))
            order.extend(idx)
        inverse = np.argsort(order)
        return tf.nest.map_structure(lambda *ts: tf.gather(tf.concat(ts, 0), inverse), *outs)

    def _label_limit(self):
        """Number of classes C of a sparse categorical loss (labels must lie in [0, C)),
        read from the model's output; `None` when the loss takes no class ids or the output
        width is unknown."""
        if not hasattr(self, "_label_limit_value"):
            loss = self.loss
            name = " ".join(str(n) for n in (
                getattr(loss, "name", None), getattr(loss, "__name__", None),
                getattr(getattr(loss, "fn", None), "__name__", None),
                getattr(getattr(loss, "func", None), "__name__", None)) if n)
            limit = None
            if "sparse_categorical" in name:
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
            return str(tf.nest.map_structure(
                lambda t: tuple(getattr(t, "shape", np.shape(t))), structure))

        def refuse(detail):
            raise ValueError(
                f"Task '{name}': its {which} inputs do not fit the model '{self.model.name}': "
                f"{detail}. The task holds x of shape {describe(x)}; the model takes "
                f"{describe(expected)} (batch dimension first). Give the task's x the "
                "model's input structure: one array for one input, a tuple/list in the "
                "order of model.inputs, or a dict keyed by the input names.")

        try:
            if isinstance(expected, dict) and isinstance(x, dict):
                if set(expected) != set(x):
                    refuse(f"its dict keys {sorted(x)} are not the model's input names "
                           f"{sorted(expected)}")
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
            if len(want) != len(got) or any(
                    w is not None and w != g for w, g in zip(want, got)):
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
                "give class ids (y = np.argmax(y, axis=-1)).")

    def _checked(self, task, batches, which):
        """`batches` (an iterator of (x, y)): its first batch's inputs checked by
        `_check_inputs` and label layout by `_check_label_layout`, and every label batch
        by `_check_labels`."""
        limit = self._label_limit()

        def checked():
            first = True
            for batch in batches:
                if isinstance(batch, (tuple, list)) and len(batch) == 2:
                    if first:
                        self._check_inputs(task, batch[0], which)
                        self._check_label_layout(task, batch[1], which)
                        first = False
                    if limit is not None:
                        self._check_labels(task, batch[1], which)
                yield batch

        return checked()

    def _checked_streams(self, task, streams):
        """`Task.streams` output with both iterators label-checked."""
        train, meta = streams
        return self._checked(task, train, "train"), self._checked(task, meta, "meta")

    def _adapt_group(self, tasks, task_ids, rngs, start=None):
        """Adapts a group of tasks in lock-step for K steps (see `warpkeras.trainers.parallel`),
        accumulating what the objectives need.

        Returns a dict of per-task results stacked along axis 0 (parameters packed, see
        `_Packer`) and a boolean ``finite`` array: a task whose loss or gradients became
        non-finite is to be dropped.
        """
        size = len(tasks)
        pairs = [self._task_rngs(r) for r in rngs]
        if self.init_objective in ("maml", "fomaml") and self.warp_mode is None:
            return self._maml_group(tasks, task_ids, pairs)
        streams = [self._checked_streams(t, t.streams(a, b)) for t, (a, b) in zip(tasks, pairs)]
        train_its = [s[0] for s in streams]
        online = self.warp_mode in ("online", "continual")
        meta_its = [s[1] for s in streams] if online else None
        carry = self._initial_carry(size, start)
        # Random draws (dropout) derive from (seed, meta step, task); the state then carries
        # them on from step to step, so every forward pass draws fresh values.
        meta_step = int(self.step.numpy())
        carry["state"] = self._reseed_stacked(carry["state"],
                                              [(meta_step, tid, 0) for tid in task_ids])
        theta_start = carry["theta"]
        outs = []
        first_batch = None
        for k in range(self.inner_steps):
            train_batches = [next(it) for it in train_its]
            if first_batch is None:
                first_batch = train_batches
            if self.warp_mode == "offline":
                self._store(task_ids, k, carry)
            meta_batches = [next(it) for it in meta_its] if online else [()] * size
            carry, out = self._by_shape(
                lambda c, b, m: self._group_step(c, b[0], b[1], m), tasks, (carry,),
                [train_batches, meta_batches])
            if self.warp_mode == "continual":
                self._continual_tick(out["g_phi"], out["g_hyper"])
            outs.append(out)
        if self.warp_mode == "offline" and self.buffer_final_point:
            self._store(task_ids, self.inner_steps, carry)  # θ_K (Algorithm 2, line 9)
        finite = np.all([np.asarray(o["finite"]) for o in outs], axis=0)
        result = {"carry": carry,
                  "losses": np.stack([np.asarray(o["loss"]) for o in outs], axis=1),
                  "metrics": np.stack([np.asarray(o["metric"]) for o in outs], axis=1),
                  "metas": (np.stack([np.asarray(o["meta"]) for o in outs], axis=1)
                            if online else None)}
        if self.init_objective == "leap":
            result["init_grads"], ok = self._by_shape(
                lambda c, b: self._group_leap_close(c, b[0], b[1]), tasks, (carry,),
                [[next(it) for it in train_its]])
            finite &= np.asarray(ok)
        elif self.init_objective == "reptile":
            result["init_grads"] = tuple(a - b for a, b in zip(theta_start, carry["theta"]))
        elif self.init_objective in ("maml", "fomaml"):
            queries = [next(self._checked(t, t.batches("meta", b), "meta"))
                       for t, (_, b) in zip(tasks, pairs)]
            maml_state = self._reseed_stacked(self._initial_carry(size)["state"],
                                              [(meta_step, tid, 1) for tid in task_ids])
            _, result["init_grads"], ok = self._by_shape(
                lambda th, st, s, q: self._group_maml(th, st, s[0], s[1], q[0], q[1]), tasks,
                (theta_start, maml_state), [first_batch, queries])
            finite &= np.asarray(ok)
        if self.warp_mode == "online":
            # summed over the K steps here, and over the tasks in `train_step`
            scale = self._warp_scale(self.inner_steps)
            result["warp_grads"] = tuple(a * scale for a in carry["warp_acc"])
            result["hyper_grads"] = carry["hyper_acc"] * scale
        result["finite"] = finite
        result["first_batch"] = first_batch  # for the moving statistics at θ0
        return result

    def _store(self, task_ids, k, carry):
        """Offline mode: appends every task's θ_k (and momentum buffer) to the buffer; called
        for k = 0 … K − 1 before each step and, with `buffer_final_point`, for θ_K."""
        theta = [np.asarray(t) for t in carry["theta"]]
        velocity = [np.asarray(v) for v in carry["velocity"]] if self.use_momentum else None
        for g, tid in enumerate(task_ids):
            self.buffer.add(tid, k, [t[g] for t in theta],
                            [v[g] for v in velocity] if velocity is not None else None)

    def _maml_group(self, tasks, task_ids, pairs):
        size = len(tasks)
        carry = self._initial_carry(size)
        meta_step = int(self.step.numpy())
        carry["state"] = self._reseed_stacked(carry["state"],
                                              [(meta_step, tid, 1) for tid in task_ids])
        streams = [self._checked_streams(t, t.streams(a, b)) for t, (a, b) in zip(tasks, pairs)]
        support = [next(s[0]) for s in streams]
        loss, g, ok = self._by_shape(
            lambda th, st, s, q: self._group_maml(th, st, s[0], s[1], q[0], q[1]), tasks,
            (carry["theta"], carry["state"]),
            [support, [next(s[1]) for s in streams]])
        return {"finite": np.asarray(ok), "losses": np.asarray(loss)[:, None],
                "metrics": np.zeros((size, 1)), "metas": None, "init_grads": g,
                "first_batch": support}  # for the moving statistics at θ0

    def _continual_tick(self, g_phi, g_hyper):
        """Algorithm 3: add this step's warp gradient; apply every η steps."""
        g_phi = [g[0] for g in g_phi]
        if not bool(_all_finite(g_phi)):
            self._nan_points = getattr(self, "_nan_points", 0) + 1  # its task is counted too
            return
        for v, g in zip(self._stream_acc, self._phi_packer.unpack(g_phi)):
            v.assign_add(g)
        self._stream_count.assign_add(1)
        eta = self.meta_interval or 1
        if int(self._stream_count.numpy()) >= eta:
            scale = self._warp_scale(eta)
            self._apply_warp(self._phi_packer.pack([v * scale for v in self._stream_acc]))
            for v in self._stream_acc:
                v.assign(tf.zeros_like(v))
            self._stream_count.assign(0)

    # ------------------------------------------------------------------------------------
    # one meta step
    def _offline_updates(self, tasks, rng):
        """Algorithm 2, lines 12–23: warp updates from the replay buffer, each on the
        gradients of (up to) η points combined by `warp_gradient_reduction`."""
        eta = self.meta_interval or 1
        batch_iters = {}
        logs = {"warp_updates": 0, "meta_loss": []}
        acc, hyper, count = None, None, 0
        updates_left = self.max_warp_updates
        state = self._start_values()[2]
        step = int(self.step.numpy())

        def apply():
            scale = self._warp_scale(count)
            self._apply_warp(tuple(a * scale for a in acc))
            if self._hyper_vars:
                self._apply_hyper(hyper * scale)
            logs["warp_updates"] += 1

        for entry in self.buffer.drain(rng):
            tid = entry["task_id"]
            if tid not in batch_iters:
                r1, r2 = self._task_rngs(np.random.default_rng([self.seed, step, 7919, tid]))
                batch_iters[tid] = tasks[tid].streams(r1, r2)
            train_it, meta_it = batch_iters[tid]
            x, y = next(train_it)
            meta_batch = next(meta_it)
            velocity = tuple(entry["velocity"]) if self.use_momentum else ()
            point_state = self._reseed(state, step, tid, 2, entry["step"])
            meta, g_phi, g_hyper, ok = self._warp_point(tuple(entry["theta"]), velocity,
                                                        point_state, x, y, meta_batch)
            if not bool(ok):
                self._nan_points = getattr(self, "_nan_points", 0) + 1  # a point, not a task
                continue
            acc = g_phi if acc is None else tuple(a + g for a, g in zip(acc, g_phi))
            hyper = g_hyper if hyper is None else hyper + g_hyper
            count += 1
            logs["meta_loss"].append(float(meta))
            if count == eta:
                apply()
                acc, hyper, count = None, None, 0
                if updates_left is not None:
                    updates_left -= 1
                    if updates_left <= 0:
                        break
        if count and (updates_left is None or updates_left > 0):
            apply()
        self.buffer.clear()
        return logs

    def _record_diverged(self, names):
        """Keeps the names of the tasks dropped at this meta step in ``self.diverged``."""
        if not hasattr(self, "diverged"):
            self.diverged = {}
        if names:
            self.diverged[int(self.step.numpy())] = list(names)

    def _has_statistics(self):
        """Whether the model has floating state (batch-norm moving statistics)."""
        return any(tf.as_dtype(v.dtype).is_floating for v in self.partition.state_variables)

    def _statistics(self, theta, state, x):
        """Packed `state` with its moving statistics set to those of batch `x` at packed
        `theta` (see "Batch-norm statistics" and `warpkeras.export.batch_statistics`)."""
        if not self._has_statistics():
            return state
        if getattr(self, "_statistics_fn", None) is None:
            from warpkeras.export import batch_statistics

            sp, tp = self._state_packer, self._theta_packer

            def statistics(theta, state, x):
                return sp.pack(batch_statistics(self.partition, tp.unpack(theta), self._phi(),
                                                x, sp.unpack(state)))

            self._statistics_fn = tf.function(statistics, reduce_retracing=True)
        return self._statistics_fn(theta, state, x)

    def _statistics_batches(self, res, finite):
        """The inputs of the first training batch of each finite task of a group (for the
        moving statistics)."""
        batches = res.get("first_batch")
        if batches is None or not self._has_statistics():
            return []
        return [batches[g][0] for g in np.flatnonzero(finite)]

    def _write_moving_statistics(self, inputs):
        """Sets the model's moving statistics to the mean over `inputs` (one batch per
        task of the meta-batch) of the batch statistics at the current θ0 and φ (see
        "Batch-norm statistics" in the class docstring). Only floating state is written
        (batch-norm moving mean / variance); random-number generator states are left to
        the seed handling."""
        if not inputs or not self._has_statistics():
            return
        theta, _, state = self._start_values()
        sums = None
        for x in inputs:
            part = [np.asarray(t, dtype=np.float64) if d.is_floating else None
                    for t, d in zip(self._statistics(theta, state, x),
                                    self._state_packer.groups)]
            sums = part if sums is None else [
                None if a is None else a + b for a, b in zip(sums, part)]
        values = self._state_packer.unpack(
            [c if s is None else tf.convert_to_tensor(s / len(inputs), dtype=c.dtype)
             for s, c in zip(sums, state)])
        for v, value in zip(self.partition.state_variables, values):
            if tf.as_dtype(v.dtype).is_floating:
                v.assign(value)

    def train_step(self, tasks, rng):
        """One meta step on a list of tasks.

        A task whose loss or gradients become non-finite is dropped from the meta-update
        (with a `RuntimeWarning` naming it); ``self.diverged`` maps the (0-based) meta step
        to the names of the tasks dropped there.

        Args:
            tasks: the meta-batch, a list of `warpkeras.Task`.
            rng: the step's `numpy.random.Generator`.

        Returns:
            A dict of logs: ``loss`` (and ``accuracy``): the mean over the tasks that stayed
            finite of the last adaptation step's value, NaN when none did;
            ``diverged_tasks``: tasks dropped at this step; ``nan_tasks``: tasks dropped so
            far (a running total); ``meta_loss``; offline/continual modes: ``nan_points``,
            replay-buffer points / stream steps whose warp gradient was non-finite and
            skipped at this step (not tasks); offline: ``warp_updates``; meta-learned α /
            μ: ``inner_learning_rate`` / ``inner_momentum``.
        """
        if self.buffer is not None:
            self.buffer.clear()
        size = 1 if self.warp_mode == "continual" else self.executor.group_size(len(tasks))
        rngs = rng.spawn(len(tasks))
        sums, counts = {}, {}
        losses, metrics, metas, dropped = [], [], [], 0
        diverged = []  # names of this step's dropped tasks
        self._nan_points = 0
        stream = self._start_values() if self.warp_mode == "continual" else None
        moving = []  # batch inputs, for the moving statistics at θ0
        for lo in range(0, len(tasks), size):
            group = tasks[lo:lo + size]
            ids = list(range(lo, lo + len(group)))
            res = self._adapt_group(group, ids, rngs[lo:lo + len(group)], start=stream)
            finite = res["finite"]
            for g in np.flatnonzero(~finite):
                dropped += 1
                name = str(getattr(group[g], "name", ids[g]))
                diverged.append(name)
                warnings.warn(
                    f"Meta step {int(self.step.numpy())}: task '{name}' (number {ids[g]} "
                    "of the meta-batch) produced a non-finite loss or gradient; it is "
                    "dropped from this meta-update (see the logs' `diverged_tasks` and "
                    "`trainer.diverged`).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if stream is not None and finite.all():
                c = res["carry"]
                stream = (tuple(t[0] for t in c["theta"]),
                          tuple(v[0] for v in c.get("velocity", ())),
                          tuple(s[0] for s in c["state"]))
            if not finite.any():
                continue
            moving.extend(self._statistics_batches(res, finite))
            losses.extend(res["losses"][finite, -1].tolist())
            metrics.extend(res["metrics"][finite, -1].tolist())
            if res["metas"] is not None:
                metas.extend(res["metas"][finite].ravel().tolist())
            for key in ("warp_grads", "init_grads"):
                if key in res:
                    part = self.executor.masked_sum(list(res[key]), finite)
                    sums[key] = part if key not in sums else [a + b for a, b in zip(sums[key], part)]
                    counts[key] = counts.get(key, 0) + int(finite.sum())
            if "hyper_grads" in res and self._hyper_vars:
                part = tf.reduce_sum(tf.boolean_mask(res["hyper_grads"], finite), axis=0)
                sums["hyper"] = part if "hyper" not in sums else sums["hyper"] + part
        self.nan_tasks.assign_add(dropped)
        logs = {}
        if stream is not None:
            self.partition.assign_task(self._theta_packer.unpack(stream[0]))
        if "warp_grads" in sums:
            scale = self._warp_scale(counts["warp_grads"])
            self._apply_warp(tuple(g * scale for g in sums["warp_grads"]))
            if "hyper" in sums:
                self._apply_hyper(sums["hyper"] * scale)
        if "init_grads" in sums:
            self._apply_init(tuple(g / float(counts["init_grads"]) for g in sums["init_grads"]))
        if self.warp_mode == "offline" and len(self.buffer):
            off = self._offline_updates(tasks, rng)
            logs["warp_updates"] = off["warp_updates"]
            if off["meta_loss"]:
                logs["meta_loss"] = float(np.mean(off["meta_loss"]))
        elif metas:
            logs["meta_loss"] = float(np.mean(metas))
        # Means over the tasks that stayed finite; `diverged_tasks` says how many did not
        # (and the loss is NaN when none did).
        logs["loss"] = float(np.mean(losses)) if losses else math.nan
        if self.accuracy and self.init_objective not in ("maml", "fomaml"):
            logs["accuracy"] = float(np.mean(metrics)) if metrics else math.nan
        logs["diverged_tasks"] = dropped
        logs["nan_tasks"] = int(self.nan_tasks.numpy())
        if self.warp_mode in ("offline", "continual"):
            logs["nan_points"] = self._nan_points
        self._write_moving_statistics(moving)  # at the updated θ0 and φ
        self._record_diverged(diverged)
        if self._hyper_vars:
            logs["inner_learning_rate"] = float(self.inner_lr.numpy())
            if self.learn_mu:
                logs["inner_momentum"] = float(self.inner_mu.numpy())
        return logs

    # ------------------------------------------------------------------------------------
    # state saved by checkpoints (`fit`, `restore` and the loop: `warpkeras.trainers.loop`)
    def _checkpoint_items(self):
        items = {"model": self.model, "step": self.step, "nan_tasks": self.nan_tasks,
                 "inner_lr": self.inner_lr, "inner_mu": self.inner_mu,
                 "stream_count": self._stream_count}
        if self.warp_mode is not None:
            items["meta_optimizer"] = self.meta_optimizer
        if self._learns_init():
            items["init_optimizer"] = self.init_optimizer
        if self._hyper_vars:
            items["hyper_optimizer"] = self.hyper_optimizer
        for i, v in enumerate(self._stream_acc):
            items[f"stream_acc_{i}"] = v
        return items

    # ------------------------------------------------------------------------------------
    # export
    def export(self, path, steps=None, overwrite=False, **kwargs):
        """Exports the meta-learned model as an adaptive SavedModel (see
        `warpkeras.export_adaptive`) with this trainer's loss, inner learning rate and
        momentum: `serving_default` predicts with θ0 and φ, `adapt` and `adapt_and_predict`
        run `steps` warped SGD steps on a support set inside the graph.

        Args:
            path: the SavedModel folder.
            steps: default adaptation steps recorded in the metadata (default
                `inner_steps`).
            overwrite: replace an existing SavedModel at `path` (without it an existing,
                non-empty folder is refused).
            **kwargs: forwarded to `warpkeras.export_adaptive` (e.g. ``from_logits``,
                ``input_spec``, ``max_rows``, ``max_row_steps``, ``max_steps``).

        The served model adapts in training mode, as the trainers' inner loop does, and
        predicts in `eval_training_mode` (``training=True``,
        ``predict_training=eval_training_mode``; see "Batch-norm statistics" above), so
        ``adapt_and_predict`` on a task's training set (full batches) and test inputs
        gives `evaluate`'s test predictions.

        Returns:
            The path written.
        """
        from warpkeras.export import export_adaptive

        kwargs.setdefault("training", True)
        kwargs.setdefault("predict_training", self.eval_training_mode)
        kwargs.setdefault("untagged", self.partition.untagged)
        return export_adaptive(
            self.model, path, loss=self.loss, learning_rate=float(self.inner_lr.numpy()),
            momentum=float(self.inner_mu.numpy()) if self.use_momentum else None,
            steps=self.inner_steps if steps is None else steps, overwrite=overwrite,
            **kwargs)

    # ------------------------------------------------------------------------------------
    # evaluation
    def adapt(self, task, steps=None, seed=0, eval_every=None, record=True,
              inner_optimizer=None):
        """Adapts θ from θ0 on `task` for `steps` SGD steps with φ frozen.

        Args:
            task: a `warpkeras.Task`.
            steps: number of steps (default `inner_steps`).
            seed: seed of the task's batches.
            eval_every: evaluate held-out test data every this many steps (and at 0 and
                the end); `None`: only at 0 and at the end.
            record: keep per-step curves.
            inner_optimizer: `None` (the trainer's warped SGD step with its inner learning
                rate and momentum), or an inner optimiser such as `warpkeras.KFAC`, which
                then makes every step with its own learning rate (and state, reset for
                each adaptation); φ stays frozen.

        Returns:
            ``(theta, curves)``: the adapted task values (a list matching
            `partition.task_variables`) and a dict of per-step ``train_loss`` /
            ``train_accuracy``, ``test_steps`` / ``test_loss`` / ``test_accuracy`` and the
            ``path_length`` in (θ, L(θ)) (WarpGrad Eq. 9).
        """
        steps = self.inner_steps if steps is None else int(steps)
        task = as_task(task)
        rng = np.random.default_rng([self.seed, 104729, seed])
        batches = self._checked(task, task.batches("train", rng), "train")
        theta, velocity, state = self._start_values(task)
        state = self._reseed(state, 104729, seed)
        step_fn = self._plain_step
        if inner_optimizer is not None:
            if not hasattr(inner_optimizer, "adaptation_step"):
                raise TypeError(
                    f"adapt: inner_optimizer={_v.describe(inner_optimizer)} is not valid: "
                    "expected an inner optimiser such as warpkeras.KFAC(...) or None.")
            # The optimiser's state travels in the momentum slot of the step.
            step_fn, velocity = inner_optimizer.adaptation_step(self, theta, seed)
        test = task.test_data()
        if test is not None:
            self._check_inputs(task, test[0], "test")
            self._check_label_layout(task, test[1], "test")
            self._check_labels(task, test[1], "test")
        curves = {"train_loss": [], "train_accuracy": [], "test_steps": [], "test_loss": [],
                  "test_accuracy": [], "path_length": 0.0}

        last = None  # the latest adaptation batch's inputs

        def run_test(k):
            if test is None:
                return
            # Inference mode: the statistics of the latest support batch at θ_k (θ0: the
            # saved ones); see "Batch-norm statistics" in the class docstring.
            at = (state if self.eval_training_mode or last is None
                  else self._statistics(theta, state, last))
            loss, metric = self._evaluate_point(theta, at, test[0], test[1])
            curves["test_steps"].append(k)
            curves["test_loss"].append(float(loss))
            curves["test_accuracy"].append(float(metric))

        run_test(0)
        losses, metrics, sqs = [], [], []
        for k in range(steps):
            x, y = next(batches)
            theta, velocity, state, loss, metric, sq, _ = step_fn(
                theta, velocity, state, x, y)
            last = x
            losses.append(loss)
            metrics.append(metric)
            sqs.append(sq)
            if eval_every and (k + 1) % eval_every == 0 and k + 1 < steps:
                run_test(k + 1)
        run_test(steps)
        losses = [float(v) for v in losses]
        sqs = [float(v) for v in sqs]
        # segments θ_{k-1} -> θ_k with the losses measured on the steps' batches
        curves["path_length"] = float(sum(
            math.sqrt(sqs[k - 1] + (losses[k] - losses[k - 1]) ** 2) for k in range(1, steps)))
        if record:
            curves["train_loss"] = losses
            curves["train_accuracy"] = [float(v) for v in metrics]
        return self._theta_packer.unpack(theta), curves

    def evaluate(self, tasks, steps=None, eval_every=None, seed=0, verbose=1,
                 inner_optimizer=None):
        """Adapts from θ0 (φ frozen) on each task and summarises (mean and std over tasks).

        The report holds per-task learning curves, the final test loss / accuracy, and the
        area under the training-error curve (Leap's AUC: the mean over the adaptation steps
        of 1 − accuracy for classification, of the loss otherwise).

        Args:
            tasks: a list of `warpkeras.Task` (held-out tasks), a `TaskSampler`, or one
                `Task`.
            steps: adaptation steps (default `inner_steps`).
            eval_every: test-set evaluation interval (see `adapt`).
            seed: seed of the batches.
            verbose: 1 shows a progress bar over tasks.
            inner_optimizer: the adaptation's optimiser (see `adapt`); `None`: warped SGD.

        Returns:
            A dict with ``final_test_loss``, ``final_test_accuracy``, ``auc``,
            ``final_train_loss``, ``path_length`` (each ``{"mean", "std", "values",
            "diverged", "mean_of_finite"}``), ``diverged`` (``{"count", "tasks"}``, the
            names of the tasks whose loss became non-finite: their values are NaN, and so
            is every mean over tasks they are part of), ``curves`` (per task, with its
            name under ``"task"``) and ``mean_curves``; see `summarize`.

        Warns:
            RuntimeWarning: naming the tasks that diverged.
        """
        if isinstance(tasks, Task):
            tasks = [tasks]
        tasks = [as_task(t) for t in (tasks.tasks if hasattr(tasks, "sample") else tasks)]
        steps = self.inner_steps if steps is None else int(steps)
        bar = keras.utils.Progbar(len(tasks), unit_name="task") if verbose else None
        per_task = []
        for i, task in enumerate(tasks):
            _, curves = self.adapt(task, steps, seed=seed + i, eval_every=eval_every,
                                   inner_optimizer=inner_optimizer)
            curves["task"] = str(task.name)
            per_task.append(curves)
            if bar is not None:
                bar.update(i + 1)
        report = summarize(per_task, self.accuracy)
        if report["diverged"]["count"]:
            warnings.warn(
                f"{report['diverged']['count']} of {len(tasks)} evaluation tasks diverged "
                f"(non-finite loss while adapting or testing): "
                f"{', '.join(report['diverged']['tasks'])}. Their values are NaN and so are "
                "the means (see each statistic's `mean_of_finite`).",
                RuntimeWarning, stacklevel=2)
        return report


def _finite(value):
    return value is not None and math.isfinite(float(value))


def _stats(values, diverged=None):
    """Mean and std over tasks that never silently drop a diverged task.

    Args:
        values: one value per task, `None` where the task has no such value (e.g. no test
            data): those tasks are left out.
        diverged: per task, whether it diverged (its value then counts as NaN).

    Returns:
        ``{"mean", "std", "values", "diverged", "mean_of_finite"}``: ``values`` holds the
        measured tasks' values in task order (NaN for diverged tasks); ``mean`` / ``std``
        are over all of them, so NaN when any diverged; ``diverged`` counts those;
        ``mean_of_finite`` is the mean over the others (NaN when there are none).
    """
    diverged = diverged if diverged is not None else [False] * len(values)
    measured = [math.nan if d or not _finite(v) else float(v)
                for v, d in zip(values, diverged) if v is not None]
    finite = [v for v in measured if not math.isnan(v)]
    bad = len(measured) - len(finite)
    mean = math.nan if bad or not measured else float(np.mean(finite))
    std = math.nan if bad or not measured else float(np.std(finite))
    return {"mean": mean, "std": std, "values": measured, "diverged": bad,
            "mean_of_finite": float(np.mean(finite)) if finite else math.nan}


def summarize(per_task, accuracy):
    """Summary statistics of `adapt` curves over tasks (see `MetaTrainer.evaluate`).

    A task *diverged* when a training or test loss or its path length is not finite; its
    values are NaN in every statistic (its accuracy, computed on non-finite predictions,
    would mean nothing), so means over tasks are NaN rather than means over the survivors.

    Args:
        per_task: `adapt` curves per task; an optional ``"task"`` entry names the task.
        accuracy: whether accuracies were recorded (the AUC then uses 1 − accuracy).

    Returns:
        A dict: ``tasks``; ``final_test_loss``, ``final_test_accuracy``,
        ``final_train_loss``, ``auc``, ``path_length`` (each as `_stats` returns:
        ``mean``, ``std``, ``values``, ``diverged``, ``mean_of_finite``); ``diverged``
        (``{"count", "tasks"}``: the names of the diverged tasks); ``curves`` and, when
        curves were recorded, ``mean_curves``.
    """
    names = [str(c.get("task", f"task {i}")) for i, c in enumerate(per_task)]
    diverged = [
        not all(_finite(v) for v in list(c["train_loss"]) + list(c["test_loss"]))
        or not _finite(c.get("path_length", 0.0))
        for c in per_task
    ]
    auc = []
    for c in per_task:
        curve = ([1.0 - a for a in c["train_accuracy"]] if accuracy else c["train_loss"])
        auc.append(float(np.mean(curve)) if len(curve) else None)
    report = {
        "tasks": len(per_task),
        "final_test_loss": _stats(
            [c["test_loss"][-1] if c["test_loss"] else None for c in per_task], diverged),
        "final_test_accuracy": _stats(
            [c["test_accuracy"][-1] if c["test_accuracy"] and accuracy else None
             for c in per_task], diverged),
        "final_train_loss": _stats(
            [c["train_loss"][-1] if c["train_loss"] else None for c in per_task], diverged),
        "auc": _stats(auc, diverged),
        "path_length": _stats([c.get("path_length") for c in per_task], diverged),
        "diverged": {"count": int(sum(diverged)),
                     "tasks": [n for n, d in zip(names, diverged) if d]},
        "curves": per_task,
    }
    if per_task and per_task[0]["train_loss"]:
        report["mean_curves"] = {
            key: np.mean([c[key] for c in per_task], axis=0).tolist()
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
            if per_task[0][key] and all(len(c[key]) == len(per_task[0][key]) for c in per_task)
        }
        report["mean_curves"]["test_steps"] = per_task[0]["test_steps"]
    return report
