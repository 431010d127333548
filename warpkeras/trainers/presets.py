"""The objectives named by `MetaTrainer`'s keyword arguments (``warp_mode=``,
``init_objective=``, ``leap_norm=``, ...), the way the front-ends (`WarpTrainer`,
`LeapTrainer`, ...) choose them: each argument is checked with a message naming it, then
turned into `warpkeras.meta` objectives."""

import functools

import keras

from warpkeras import _validation as _v
from warpkeras.buffer import ReplayBuffer
from warpkeras.meta import MAML, Leap, MetaTrainingError, Reptile, WarpObjective
from warpkeras.meta.offline import offline_updates

WARP_MODES = (None, "online", "offline", "continual")
WARP_OBJECTIVES = ("exact", "approx")
INIT_OBJECTIVES = (None, "leap", "maml", "fomaml", "reptile")

#: The keyword arguments that name objectives, with their defaults.
OBJECTIVE_OPTIONS = {
    "warp_mode": None,
    "warp_objective": "exact",
    "init_objective": None,
    "init_weight": 1.0,
    "init_optimizer": None,
    "learn_inner_learning_rate": False,
    "learn_inner_momentum": False,
    "hyper_learning_rate": 1e-3,
    "hyper_clip": 1e-3,
    "meta_interval": None,
    "max_warp_updates": None,
    "warp_gradient_reduction": "mean",
    "buffer_final_point": True,
    "buffer_capacity": None,
    "buffer_overflow": "reservoir",
    "buffer_spill_dir": None,
    "leap_norm": "length",
    "leap_sign_correction": True,
    "leap_loss_in_path": True,
    "meta_loss": None,
    "maml_unroll": None,
    "maml_recompute": False,
}


def objectives_from_options(where, options, meta_optimizer, inner_momentum, seed):
    """The objectives for `options` (a dict of `OBJECTIVE_OPTIONS` keys).

    The keyword arguments (all optional):

        warp_mode: ``None``, ``"online"``, ``"offline"`` or ``"continual"``.
        warp_objective: ``"exact"`` (second order through the inner step) or ``"approx"``.
        init_objective: ``None``, ``"leap"``, ``"maml"``, ``"fomaml"`` or ``"reptile"``.
        init_weight: λ in J = L(φ) + λC(θ0): scales the θ0 meta-gradient.
        maml_unroll: MAML's K inner steps written into the graph one after the other
            (True) or run as one `tf.while_loop` (False); `None`: by K
            (`warpkeras.meta.MAML`'s ``unroll``).
        maml_recompute: MAML recomputes each inner step's activations in the backward
            pass instead of keeping them (`warpkeras.meta.MAML`'s ``recompute``).
        learn_inner_learning_rate: meta-learn α (a scalar, WarpGrad App. G "learned α");
            needs a warp mode with the exact objective to have a gradient.
        learn_inner_momentum: meta-learn μ likewise.
        hyper_learning_rate: SGD step for learned α / μ; their meta-gradients are clipped
            at `hyper_clip` (App. G: both 0.001).
        hyper_clip: clip value of the α / μ meta-gradients.
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
        init_optimizer: Keras optimizer for θ0 (default: a copy of `meta_optimizer`).

    Args:
        where: the trainer's class name (for messages).
        options: the keyword arguments given (missing ones take their defaults).
        meta_optimizer: the trainer's ``meta_optimizer`` as given (or `None`).
        inner_momentum: the trainer's ``inner_momentum`` (checked).
        seed: the trainer's seed (the replay buffer's reservoir).

    Returns:
        A list of `warpkeras.meta.MetaObjective` (the warp objective first).

    Raises:
        TypeError, MetaTrainingError: as `MetaTrainer` documents, naming the argument.
    """
    o = dict(OBJECTIVE_OPTIONS, **options)
    choice = functools.partial(_v.check_choice, where=where, error=MetaTrainingError)
    warp_mode = choice(o["warp_mode"], "warp_mode", WARP_MODES)
    warp_objective = choice(o["warp_objective"], "warp_objective", WARP_OBJECTIVES)
    init_objective = choice(o["init_objective"], "init_objective", INIT_OBJECTIVES)
    leap_norm = choice(o["leap_norm"], "leap_norm", ("length", "energy"))
    overflow = choice(o["buffer_overflow"], "buffer_overflow", ("reservoir", "spill"))
    reduction = choice(o["warp_gradient_reduction"], "warp_gradient_reduction", ("mean", "sum"))
    flag = functools.partial(_v.check_bool, where=where)
    learn_lr = flag(o["learn_inner_learning_rate"], "learn_inner_learning_rate")
    learn_mu = flag(o["learn_inner_momentum"], "learn_inner_momentum")
    sign_correction = flag(o["leap_sign_correction"], "leap_sign_correction")
    loss_in_path = flag(o["leap_loss_in_path"], "leap_loss_in_path")
    maml_unroll = flag(o["maml_unroll"], "maml_unroll", allow_none=True)
    maml_recompute = flag(o["maml_recompute"], "maml_recompute")
    if maml_unroll and maml_recompute:
        raise MetaTrainingError(
            f"{where}: maml_recompute=True recomputes the steps of MAML's symbolic loop, so "
            "it cannot be combined with maml_unroll=True: drop one."
        )
    if (maml_unroll is not None or maml_recompute) and init_objective not in ("maml", "fomaml"):
        raise MetaTrainingError(
            f"{where}: maml_unroll / maml_recompute set how MAML runs its inner steps, but "
            f"init_objective={init_objective!r}: use init_objective='maml' or drop them."
        )
    final_point = flag(o["buffer_final_point"], "buffer_final_point")
    integer = functools.partial(
        _v.check_int, where=where, error=MetaTrainingError, minimum=1, allow_none=True
    )
    interval = integer(o["meta_interval"], "meta_interval")
    max_updates = integer(o["max_warp_updates"], "max_warp_updates", example=100)
    capacity = integer(o["buffer_capacity"], "buffer_capacity", example=1000)
    number = functools.partial(_v.check_float, where=where, error=MetaTrainingError)
    init_weight = number(o["init_weight"], "init_weight", minimum=0.0, example=1.0)
    hyper_lr = number(o["hyper_learning_rate"], "hyper_learning_rate", minimum=0.0, example=1e-3)
    hyper_clip = number(
        o["hyper_clip"],
        "hyper_clip",
        minimum=0.0,
        min_inclusive=False,
        allow_none=True,
        example=1e-3,
    )
    init_optimizer = _v.get_optimizer(o["init_optimizer"], "init_optimizer", where=where)
    if (
        meta_optimizer is not None
        and meta_optimizer is init_optimizer
        and warp_mode is not None
        and init_objective is not None
    ):
        raise MetaTrainingError(
            f"{where}: meta_optimizer and init_optimizer are the same optimizer instance, "
            "but φ and θ0 each need their own optimizer state: pass two instances (or "
            "leave init_optimizer=None for a copy of meta_optimizer)."
        )
    meta_loss = _v.check_callable(
        o["meta_loss"],
        "meta_loss",
        where=where,
        signature="meta_loss(partition, loss_fn, theta, phi, meta_batch, state) -> scalar",
    )
    spill_dir = o["buffer_spill_dir"]
    if spill_dir is not None:
        spill_dir = _v.check_directory(
            spill_dir, "buffer_spill_dir", where=where, error=MetaTrainingError
        )
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
    if (learn_lr or learn_mu) and warp_mode is None:
        raise MetaTrainingError(
            "A meta-learned inner learning rate or momentum is trained through the warp "
            "objective: set a warp_mode."
        )
    if learn_mu and inner_momentum is None:
        raise MetaTrainingError(
            f"{where}: learn_inner_momentum=True needs an inner_momentum value to start "
            "from, e.g. inner_momentum=0.9."
        )
    objectives = []
    if warp_mode is not None:
        buffer = (
            ReplayBuffer(capacity, overflow, spill_dir, seed=seed)
            if warp_mode == "offline"
            else None
        )
        hyper = keras.optimizers.SGD(hyper_lr, clipvalue=hyper_clip)
        objectives.append(
            WarpObjective(
                warp_mode,
                exact=warp_objective == "exact",
                interval=interval,
                max_updates=max_updates,
                reduction=reduction,
                final_point=final_point,
                buffer=buffer,
                learn_learning_rate=learn_lr,
                learn_momentum=learn_mu,
                hyper_optimizer=hyper,
                meta_loss=meta_loss,
                optimizer=meta_optimizer,
            )
        )
    if init_objective == "leap":
        objectives.append(
            Leap(leap_norm, sign_correction, loss_in_path, init_weight, init_optimizer)
        )
    elif init_objective in ("maml", "fomaml"):
        objectives.append(
            MAML(
                init_objective == "fomaml",
                init_weight,
                init_optimizer,
                unroll=maml_unroll,
                recompute=maml_recompute,
            )
        )
    elif init_objective == "reptile":
        objectives.append(Reptile(init_weight, init_optimizer))
    return objectives


def objective_name(objective):
    """The ``init_objective`` name of an objective meta-learning θ0 (`None` otherwise)."""
    if isinstance(objective, MAML):
        return "fomaml" if objective.first_order else "maml"
    if isinstance(objective, Leap):
        return "leap"
    if isinstance(objective, Reptile):
        return "reptile"
    return None


class KeywordViews:
    """The trainer's objectives seen through the keyword arguments that choose them
    (``trainer.warp_mode``, ``trainer.init_objective``, ``trainer.buffer``, ...), and its
    configuration for logs and results files."""

    def _find(self, kind):
        return next((o for o in self.objectives if isinstance(o, kind)), None)

    @property
    def _warp(self):
        return self._find(WarpObjective)

    @property
    def warp_mode(self):
        """The warp objective's mode (``"online"``, ``"offline"``, ``"continual"``) or None."""
        return self._warp.mode if self._warp is not None else None

    @property
    def warp_objective(self):
        return ("exact" if self._warp.exact else "approx") if self._warp is not None else None

    @property
    def init_objective(self):
        """``"leap"``, ``"maml"``, ``"fomaml"``, ``"reptile"`` or None (θ0 fixed)."""
        return next((n for n in map(objective_name, self.objectives) if n), None)

    @property
    def buffer(self):
        """The offline warp objective's replay buffer (None otherwise)."""
        return getattr(self._warp, "buffer", None)

    @property
    def learn_lr(self):
        return bool(self._warp is not None and self._warp.learn_lr)

    @property
    def learn_mu(self):
        return bool(self._warp is not None and self._warp.learn_mu)

    @property
    def _hyper_vars(self):
        return self._warp.hyper_vars if self._warp is not None else []

    @property
    def init_optimizer(self):
        """The optimiser of θ0 (of the first objective meta-learning it)."""
        init = next((o for o in self.objectives if objective_name(o)), None)
        return init.optimizer if init is not None else None

    def _warp_point(self, *args):
        return self._warp.warp_point(*args)

    def _offline_updates(self, tasks, rng):
        return offline_updates(self._warp, self, tasks, rng)

    def _learns_init(self):
        return self.init_objective is not None

    def get_config(self):
        """The trainer's hyper-parameters (for logs and results files)."""
        warp = self._warp
        return {
            "class": type(self).__name__,
            "objectives": [o.get_config() for o in self.objectives],
            "warp_mode": self.warp_mode,
            "warp_objective": self.warp_objective,
            "init_objective": self.init_objective,
            "init_weight": next((o.weight for o in self.objectives if objective_name(o)), 1.0),
            "inner_learning_rate": float(self.inner_lr.numpy()),
            "inner_momentum": float(self.inner_mu.numpy()) if self.use_momentum else None,
            "inner_steps": self.inner_steps,
            "meta_batch_size": self.meta_batch_size,
            "meta_interval": warp.interval if warp is not None else None,
            "warp_gradient_reduction": warp.reduction if warp is not None else "mean",
            "buffer_final_point": (warp.final_point if self.warp_mode == "offline" else None),
            "leap_norm": next((o.norm for o in self.objectives if hasattr(o, "norm")), "length"),
            "seed": self.seed,
            "meta_optimizer": keras.optimizers.serialize(self.meta_optimizer),
        }
