"""K-FAC: natural-gradient descent with Kronecker-factored Fisher blocks, as an inner optimiser.

The package index was checked before writing this module: its ``kfac`` package is the
TensorFlow 1 graph-mode library (``tf.compat.v1``, pinned to an old tensorflow-probability),
and the other K-FAC packages there target JAX, PyTorch or MLX, so none runs on TensorFlow 2 /
Keras 3 models called through ``Model.stateless_call``.

K-FAC (Martens & Grosse, 2015, "Optimizing neural networks with Kronecker-factored
approximate curvature") approximates the Fisher information matrix F of a network by a block
diagonal, one block per layer, and each block by a Kronecker product of two small factors:

    F_l ≈ Ā_l ⊗ G_l,   Ā_l = E[ā ā^T],   G_l = E[g g^T]                      (M&G Sec. 3)

where ā is the layer's input with a homogeneous coordinate 1 appended for the bias, and
g = ∂(−log p(y|x))/∂s the derivative of the negative log-likelihood with respect to the
layer's pre-activation s = W ā. With the Keras kernel layout (input × output, bias as the
last row) the gradient block is V = E[ā g^T], and the approximate natural gradient is

    F_l^{-1} vec(V) ≈ vec(Ā_l^{-1} V G_l^{-1})                                (M&G Sec. 4.2)

For a convolution, KFC (Grosse & Martens, 2016, "A Kronecker-factored approximate Fisher
matrix for convolution layers", Sec. 3) makes the same approximation under the
assumptions of independent activations and derivatives, spatial homogeneity and spatially
uncorrelated derivatives, with ā_t the (kh·kw·c_in + 1)-vector of the input patch at output
location t ∈ T:

    F_l ≈ Ω ⊗ Γ,   Ω = E[Σ_t ā_t ā_t^T],   Γ = (1/|T|) E[Σ_t g_t g_t^T].

A `Dense` layer applied to inputs with extra axes (e.g. ``[batch, time, features]``) is
treated the same way, with T the extra axes; a layer applied several times in one forward
pass (shared weights) counts each use as further locations.

Curvature, damping and averaging as in Martens & Grosse (2015):

- the expectation over y in G is taken under the model's predictive distribution (the true
  Fisher): ``fisher="sampled"`` draws one target per example (M&G Sec. 5),
  ``fisher="exact"`` sums over all outcomes (categorical) or output units (Gaussian), and
  ``fisher="empirical"`` uses the data's labels (the empirical Fisher, which is not the
  Fisher; M&G Sec. 5 and Kunstner et al. 2019 explain why it can mislead);
- factored Tikhonov damping (M&G Sec. 6.3): each block is inverted as
  (Ā + π √λ I)^{-1} ⊗ (G + (√λ / π) I)^{-1} with π = sqrt((tr Ā / dim Ā) / (tr G / dim G));
- running averages of the factors, Ā ← ε Ā + (1 − ε) Ā_batch with ε = min(1 − 1/k, decay)
  at the k-th update (M&G Sec. 5), and the inverses recomputed every `inverse_every` steps;
- an optional norm constraint on the update, ν = min(1, sqrt(c / (α² Σ_l vec(V_l)^T
  vec(U_l)))) for the preconditioned gradients U_l (the "KL clipping" of Ba, Grosse &
  Martens 2017, "Distributed second-order optimization using Kronecker-factored
  approximations"); the SGD-updated variables enter the sum with U = V.

Left out: the Levenberg–Marquardt adaptation of λ, the re-scaling of the step by the exact
Fisher and the momentum of M&G Secs. 6–7. The step is θ ← θ − α ν U with a fixed learning
rate α, as the natural-gradient baselines of WarpGrad (Table 2, App. H) are described.

Exactness: for one `Dense` layer with a linear activation and a Gaussian likelihood of
fixed isotropic variance (``mean_squared_error``, any number of output units), the Fisher
is E[ā ā^T ⊗ J^T (2/D) I J] with J = I, i.e. exactly Ā ⊗ (2/D) I: the output Fisher does
not depend on x, so the Kronecker product is exact and, with ``fisher="exact"`` and λ → 0,
the K-FAC step is the natural-gradient step (with α = 1 the Newton step, which solves the
least-squares problem). With a softmax output the output Fisher diag(p) − p p^T depends on
x, and Ā ⊗ G is only an approximation, even for one layer.

The layers are observed by replacing their ``call`` and ``activation`` on the instances
while a step is traced (restored afterwards); do not trace other functions of the same
model from other threads at the same time.

Which parameters get K-FAC: the kernel (and bias) of every `keras.layers.Dense` and
`keras.layers.Conv2D` (``channels_last``, ``groups=1``, no LoRA, no quantisation, ``call``
not overridden) whose kernel is a task variable of the partition. Every other task variable
(batch-norm scale and offset, other layer types, a bias whose kernel is not adapted) gets a
plain SGD step with the same learning rate, θ ← θ − α ν g. Warp variables are held fixed,
so on a warped model the Fisher blocks are those of the task layers, seen through the
warp layers.

The loss defines the likelihood: ``sparse_categorical_crossentropy`` and
``categorical_crossentropy`` (from logits or probabilities) are categorical likelihoods,
``mean_squared_error`` is a Gaussian with variance D/2 per output unit (D output units), so
that Keras's per-example loss (1/D) Σ_j (y_j − f_j)² is exactly −log p(y|f) up to a
constant and the Fisher equals the Gauss–Newton matrix of the loss. Other losses support
only ``fisher="empirical"``, which assumes the loss is a mean over the batch of
per-example terms.

Example:

```python
import keras, warpkeras
trainer = warpkeras.NoMetaTrainer(model, loss="sparse_categorical_crossentropy",
                                  inner_steps=100)
report = trainer.evaluate(tasks, inner_optimizer=warpkeras.KFAC(learning_rate=0.1))
```
"""

import contextlib
import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import objectives as obj
from warpkeras._losses import as_task_loss, split_batch
from warpkeras.rules import InnerRule

__all__ = ["KFAC", "KFACPlan", "KFACStep", "FISHER_TYPES"]

FISHER_TYPES = ("sampled", "exact", "empirical")


# ------------------------------------------------------------------------------------------
# likelihoods


class _Likelihood:
    """The predictive distribution p(y | f) whose negative log-likelihood is the loss."""

    kind: str | None = None

    def __init__(self, from_logits=False):
        self.from_logits = from_logits

    def per_example(self, y, f):
        raise NotImplementedError

    def sample(self, f, seed):
        raise NotImplementedError

    def exact_terms(self, f):
        """Scalars s_k whose gradients satisfy Σ_k ∇s_k ∇s_k^T = Σ_n E_y[∇ℓ_n ∇ℓ_n^T]."""
        raise NotImplementedError


class _Categorical(_Likelihood):
    kind = "categorical"

    def __init__(self, from_logits, sparse):
        super().__init__(from_logits)
        self.sparse = sparse

    def per_example(self, y, f):
        """−log p(y | f) per example, `y` in the loss's format (class ids or one-hot)."""
        if self.sparse:
            return keras.losses.sparse_categorical_crossentropy(y, f, from_logits=self.from_logits)
        return keras.losses.categorical_crossentropy(y, f, from_logits=self.from_logits)

    def _targets(self, ids, f):
        return ids if self.sparse else tf.one_hot(ids, tf.shape(f)[-1], dtype=f.dtype)

    def _log_probs(self, f):
        if self.from_logits:
            return tf.nn.log_softmax(f)
        return tf.math.log(tf.maximum(f, keras.backend.epsilon()))

    def sample(self, f, seed):
        # Gumbel-max sampling (argmax of log p + Gumbel noise is a draw from p); unlike
        # `tf.random.stateless_categorical` it also compiles with XLA. (TensorFlow's
        # stateless generators draw other numbers under XLA: a compiled trainer samples
        # other targets than an uncompiled one, each deterministically.)
        logits = tf.cast(tf.stop_gradient(self._log_probs(f)), tf.float32)
        u = tf.random.stateless_uniform(tf.shape(logits), seed, minval=1e-20, maxval=1.0)
        ids = tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)
        return self._targets(ids, f)

    def exact_terms(self, f):
        probs = tf.stop_gradient(tf.exp(self._log_probs(f)))
        n = tf.shape(f)[0]
        terms = []
        for k in range(int(f.shape[-1])):
            y = self._targets(tf.fill([n], k), f)
            terms.append(tf.reduce_sum(tf.sqrt(probs[:, k]) * self.per_example(y, f)))
        return terms


class _Gaussian(_Likelihood):
    """N(f, σ² I) with σ² = D / 2, whose −log p is Keras's mean squared error + const."""

    kind = "gaussian"

    def per_example(self, y, f):
        return keras.losses.mean_squared_error(y, f)

    def sample(self, f, seed):
        d = int(f.shape[-1])
        noise = tf.random.stateless_normal(tf.shape(f), seed, dtype=f.dtype)
        return tf.stop_gradient(f) + np.sqrt(d / 2.0) * noise

    def exact_terms(self, f):
        d = int(f.shape[-1])
        scale = np.sqrt(2.0 / d)
        return [scale * tf.reduce_sum(f[:, j]) for j in range(d)]


def _likelihood(loss):
    kinds = as_task_loss(loss, where="KFAC").kinds()
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind.function == "sparse_categorical_crossentropy":
        return _Categorical(kind.from_logits, sparse=True)
    if kind.function == "categorical_crossentropy":
        return _Categorical(kind.from_logits, sparse=False)
    if kind.function == "mean_squared_error":
        return _Gaussian()
    return None


# ------------------------------------------------------------------------------------------
# layers and their captured inputs / pre-activations
class _Block:
    """One Kronecker-factored layer: which task values it owns and its factor sizes."""

    def __init__(self, layer, kind, kernel_index, bias_index):
        self.layer = layer
        self.kind = kind
        self.kernel_index = kernel_index
        self.bias_index = bias_index
        kshape = tuple(int(s) for s in layer.kernel.shape)
        self.kernel_shape = kshape
        self.d_in = int(np.prod(kshape[:-1]))
        self.d_out = kshape[-1]
        self.dim_a = self.d_in + (1 if bias_index is not None else 0)
        self.dim_g = self.d_out

    @property
    def name(self):
        return self.layer.name


def _factorable(layer):
    """``"dense"``, ``"conv2d"`` or the reason the layer gets plain SGD."""
    if getattr(layer, "lora_enabled", False):
        return None, "LoRA"
    if getattr(layer.dtype_policy, "quantization_mode", None) is not None:
        return None, "quantised"
    if isinstance(layer, keras.layers.Dense):
        if type(layer).call is not keras.layers.Dense.call:
            return None, "overridden call"
        return "dense", None
    if isinstance(layer, keras.layers.Conv2D):
        from keras.src.layers.convolutional.base_conv import BaseConv

        if type(layer).call is not BaseConv.call or (
            type(layer).convolution_op is not BaseConv.convolution_op
        ):
            return None, "overridden call"
        if layer.data_format != "channels_last":
            return None, "channels_first"
        if layer.groups != 1:
            return None, "grouped"
        return "conv2d", None
    return None, "not Dense/Conv2D"


@contextlib.contextmanager
def _capture(blocks):
    """Records, for every block's layer, each call's input and pre-activation.

    The layers' ``call`` and ``activation`` are replaced on the instances for the duration
    (and restored afterwards), so the records are tensors of the forward pass that runs
    inside the context: differentiable under a tape, and traced into a `tf.function`.
    """
    records = {id(b.layer): [] for b in blocks}
    saved = []
    try:
        for b in blocks:
            layer = b.layer
            had_call = "call" in layer.__dict__
            original = layer.call

            def call(inputs, *args, _layer=layer, _original=original, **kwargs):
                activation = _layer.__dict__.get("activation")
                seen = []

                def capture(z, _act=activation):
                    seen.append(z)
                    return _act(z) if _act is not None else z

                object.__setattr__(_layer, "activation", capture)
                try:
                    out = _original(inputs, *args, **kwargs)
                finally:
                    object.__setattr__(_layer, "activation", activation)
                records[id(_layer)].append((inputs, seen[0] if seen else out))
                return out

            saved.append((layer, had_call, original))
            object.__setattr__(layer, "call", call)
        yield records
    finally:
        for layer, had_call, original in saved:
            if had_call:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


def _patches(block, inputs):
    """The homogeneous inputs ā of a call, ``[N, T, dim_a]`` (T locations)."""
    layer = block.layer
    x = tf.convert_to_tensor(inputs)
    if block.kind == "conv2d":
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        rh, rw = layer.dilation_rate
        x = tf.image.extract_patches(
            x,
            sizes=[1, kh, kw, 1],
            strides=[1, sh, sw, 1],
            rates=[1, rh, rw, 1],
            padding=layer.padding.upper(),
        )
    n = tf.shape(x)[0]
    x = tf.reshape(x, [n, -1, block.d_in])
    if block.bias_index is not None:
        x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)
    return x


def _outer(a):
    """Σ over examples and locations of a a^T for a ``[N, T, d]`` tensor."""
    a2 = tf.reshape(a, [-1, a.shape[-1]])
    return tf.matmul(a2, a2, transpose_a=True)


class KFACStep(NamedTuple):
    """The outcome of one K-FAC step (`KFACPlan.step`)."""

    theta: list
    """θ_{k+1}."""
    opt_state: dict
    """The optimiser's state after the step (factors, inverses, step count)."""
    loss: tf.Tensor
    """L_task(θ_k) on the step's batch (before the step)."""
    gradients: list
    """∇θ L_task(θ_k)."""
    state: list
    """Non-trainable model state after the forward pass."""
    outputs: object = None
    """The model's predictions on the step's batch (at θ_k)."""


class KFAC(InnerRule):
    """K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) as an
    inner-loop optimiser for `MetaTrainer.adapt` / `MetaTrainer.evaluate`.

    An inner update rule (`warpkeras.rules.InnerRule`): the trainer's rule
    (``MetaTrainer(inner_rule=KFAC(...))``: meta-training with the first-order objectives,
    `adapt`, `evaluate` and the exported SavedModel) or the rule of one evaluation
    (``trainer.evaluate(tasks, inner_optimizer=KFAC(...))``). Its state is the optimiser's:
    the running Kronecker factors, their damped inverses, the step count and the seed of the
    sampled targets. The step is not differentiated (``differentiable = False``): the exact
    WarpGrad objective and second-order MAML refuse it.

    `bind` ties the configuration to a model partition and loss and returns a `KFACPlan`
    whose pure, traceable ``init`` / ``step`` functions do the work. See the module
    docstring for the approximation, the damping and what happens to layers it cannot
    factor.

    Example:

    ```python
    kfac = warpkeras.KFAC(learning_rate=0.1, damping=1e-3)
    report = trainer.evaluate(tasks, inner_optimizer=kfac)
    # or, as pure functions:
    plan = kfac.bind(warpkeras.partition(model), loss_fn)
    opt_state = plan.init(theta)
    step = plan.step(theta, phi, (x, y), opt_state)
    theta, opt_state = step.theta, step.opt_state
    ```

    Args:
        learning_rate: α > 0 of θ ← θ − α ν F̂^{-1} ∇L.
        damping: Tikhonov damping λ > 0, applied as factored damping (M&G Sec. 6.3).
        decay: ε in [0, 1) of the factors' running averages (M&G use 0.95); the first
            updates average uniformly, ε_k = min(1 − 1/k, decay).
        inverse_every: recompute the damped inverses every this many steps (>= 1; the first
            step always computes them).
        fisher: ``"sampled"`` (true Fisher, one target per example drawn from the model's
            predictive distribution; the default, as in M&G Sec. 5), ``"exact"`` (the
            expectation over targets computed exactly: one extra backward pass per class or
            output unit) or ``"empirical"`` (the data's labels).
        norm_constraint: `None`, or c > 0 bounding α² ν² Σ_l vec(V_l)^T vec(U_l) by c
            (KL clipping).
        factored_damping: use π of M&G Sec. 6.3 (True) or π = 1 (False).
        seed: int >= 0; with the adaptation's seed, it fixes the sampled targets (which
            also depend on whether the step is XLA-compiled: TensorFlow's stateless random
            generators draw other numbers there).

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range (the message
            names it).
    """

    differentiable = False

    def __init__(
        self,
        learning_rate=0.1,
        damping=1e-3,
        decay=0.95,
        inverse_every=1,
        fisher="sampled",
        norm_constraint=None,
        factored_damping=True,
        seed=0,
    ):
        where = "KFAC"
        self.learning_rate = _v.check_float(
            learning_rate,
            "learning_rate",
            minimum=0.0,
            min_inclusive=False,
            where=where,
            example=0.1,
        )
        self.damping = _v.check_float(
            damping, "damping", minimum=0.0, min_inclusive=False, where=where, example=1e-3
        )
        self.decay = _v.check_float(
            decay, "decay", minimum=0.0, maximum=1.0, max_inclusive=False, where=where, example=0.95
        )
        self.inverse_every = _v.check_int(
            inverse_every, "inverse_every", minimum=1, where=where, example=10
        )
        self.fisher = _v.check_choice(fisher, "fisher", FISHER_TYPES, where=where)
        self.norm_constraint = _v.check_float(
            norm_constraint,
            "norm_constraint",
            minimum=0.0,
            min_inclusive=False,
            allow_none=True,
            where=where,
            example=1e-3,
        )
        self.factored_damping = _v.check_bool(factored_damping, "factored_damping", where=where)
        self.seed = _v.check_seed(seed, "seed", where=where)

    def get_config(self):
        """The hyper-parameters (for logs and results files)."""
        return {
            "class": "KFAC",
            "learning_rate": self.learning_rate,
            "damping": self.damping,
            "decay": self.decay,
            "inverse_every": self.inverse_every,
            "fisher": self.fisher,
            "norm_constraint": self.norm_constraint,
            "factored_damping": self.factored_damping,
            "seed": self.seed,
        }

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"KFAC({args})"

    def bind(self, partition, loss):
        """A `KFACPlan` for `partition` (a `warpkeras.Partition`) and `loss` (a Keras loss
        name, object or ``fn(y_true, y_pred)``).

        Raises:
            ValueError: ``fisher`` is ``"sampled"`` or ``"exact"`` and the loss is not one
                whose likelihood is known (see the module docstring).
        """
        return KFACPlan(self, partition, loss)

    # -- the inner rule (warpkeras.rules.InnerRule) ------------------------------------------
    def build(self, partition, loss=None):
        """Binds the rule to `partition` and `loss` (a `KFACPlan`, kept as ``plan``)."""
        self.plan = self.bind(partition, loss)
        self.built = True

    def _bound(self):
        plan = getattr(self, "plan", None)
        if plan is None:
            raise ValueError(
                "KFAC: the rule is not built: give it to a trainer "
                "(inner_rule=... or inner_optimizer=...) or call "
                "rule.build(partition, loss) first."
            )
        return plan

    def init(self, theta=None, seed=0):
        """The state before the first step (`KFACPlan.init`): zero factors, identity
        inverses, step 0 and the seed ``[self.seed, seed]`` of the sampled targets."""
        return self._bound().init(theta, seed=seed)

    def value_and_grad(self, loss_fn, theta, state, batch):
        """The loss, gradients and this batch's Kronecker factors (`KFACPlan.observe`),
        the factors handed to `update` as ``extra``."""
        plan = self._bound()
        loss, grads, aux, a, g = plan.observe(loss_fn, theta, batch, plan.step_seed(state))
        return loss, grads, aux, (a, g)

    def update(self, grads, state, theta, extra=None):
        """θ_{k+1} = θ_k − α ν F̂^{-1} g with the factors of ``extra`` averaged into the
        state (`KFACPlan.update`)."""
        if extra is None:
            raise ValueError(
                "KFAC.update needs the batch's factors: step it with "
                "warpkeras.rules.inner_step (which observes the forward pass)."
            )
        return self._bound().update(list(theta), grads, extra[0], extra[1], state)


class KFACPlan:
    """`KFAC` bound to a partition and a loss: the factored blocks and pure step functions.

    Attributes:
        blocks: the factored layers, each with ``name``, ``kind`` (``"dense"`` /
            ``"conv2d"``), ``kernel_index`` / ``bias_index`` (positions in θ) and
            ``dim_a`` / ``dim_g`` (factor sizes).
        sgd_indices: positions in θ that get plain SGD.
        skipped: ``{layer name: reason}`` for Dense / Conv2D layers with task variables that
            are not factored.
    """

    def __init__(self, config, partition, loss):
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        if not callable(loss):
            raise TypeError(
                f"KFAC: loss={_v.describe(loss)} is not valid: expected a Keras "
                "loss name or object, or fn(y_true, y_pred)."
            )
        self.config = config
        self.partition = partition
        self.loss = loss
        self.likelihood = _likelihood(loss)
        if self.likelihood is None and config.fisher != "empirical":
            name = as_task_loss(loss, where="KFAC").name
            raise ValueError(
                f"KFAC: fisher={config.fisher!r} needs the model's predictive distribution, "
                f"which is known for the sparse / categorical cross-entropy and mean squared "
                f"error losses, not for loss {name or loss!r}: use one of those or "
                "fisher='empirical'."
            )
        index = {id(v): i for i, v in enumerate(partition.task_variables)}
        self.blocks, self.skipped = [], {}
        owned = set()
        for layer in partition.model._flatten_layers(include_self=False, recursive=True):
            kernel = (
                getattr(layer, "kernel", None)
                if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
                else None
            )
            if kernel is None or id(kernel) not in index:
                continue
            kind, why = _factorable(layer)
            if kind is None:
                self.skipped[layer.name] = why
                continue
            bias = getattr(layer, "bias", None)
            bias_index = index.get(id(bias)) if bias is not None else None
            block = _Block(layer, kind, index[id(kernel)], bias_index)
            self.blocks.append(block)
            owned.add(block.kernel_index)
            if bias_index is not None:
                owned.add(bias_index)
        self.sgd_indices = [i for i in range(len(partition.task_variables)) if i not in owned]
        if self.skipped:
            warnings.warn(
                "KFAC: these Dense / Conv2D layers are not Kronecker-factored and get plain "
                "SGD steps: " + ", ".join(f"'{k}' ({v})" for k, v in self.skipped.items()) + ".",
                UserWarning,
                stacklevel=3,
            )
        self.dtype = (
            partition.task_variables[0].dtype if partition.task_variables else keras.config.floatx()
        )

    # -- state -----------------------------------------------------------------------------
    def init(self, theta=None, seed=0):
        """The optimiser state before the first step: zero factors, identity inverses.

        Args:
            theta: unused (the factor sizes come from the layers); accepted for symmetry.
            seed: int >= 0, mixed with the optimiser's seed for the sampled targets.

        Returns:
            A dict of tensors: ``step`` (int64 scalar), ``seed`` (int64 [2]), ``A``,
            ``G``, ``A_inv``, ``G_inv`` (tuples with one ``[dim, dim]`` matrix per block, in
            θ's dtype).
        """
        del theta
        dt = self.dtype

        def zeros(d):
            return tf.zeros([d, d], dt)

        def eye(d):
            return tf.eye(d, dtype=dt)

        return {
            "step": tf.constant(0, tf.int64),
            "seed": tf.constant([int(self.config.seed), int(seed)], tf.int64),
            "A": tuple(zeros(b.dim_a) for b in self.blocks),
            "G": tuple(zeros(b.dim_g) for b in self.blocks),
            "A_inv": tuple(eye(b.dim_a) for b in self.blocks),
            "G_inv": tuple(eye(b.dim_g) for b in self.blocks),
        }

    # -- forward / backward ----------------------------------------------------------------
    def _fisher_terms(self, y, outputs, seed):
        """Scalars whose gradients, per example, give the G factors (see module docs)."""
        mode = self.config.fisher
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                "KFAC: the model has several outputs; K-FAC here supports one output tensor."
            )
        f = tf.convert_to_tensor(outputs)
        if mode == "empirical" and self.likelihood is None:
            n = tf.cast(tf.shape(f)[0], f.dtype)
            return [n * obj._scalar(self.loss(y, f))]
        if f.shape.rank != 2:
            raise ValueError(
                f"KFAC: fisher={mode!r} needs outputs of shape [batch, units], got "
                f"{f.shape}; use fisher='empirical' for other output shapes."
            )
        lik = self.likelihood
        if mode == "empirical":
            return [tf.reduce_sum(lik.per_example(y, f))]
        if mode == "sampled":
            return [tf.reduce_sum(lik.per_example(lik.sample(f, seed), f))]
        return lik.exact_terms(f)

    def factors(self, theta, phi, batch, state=None, training=True, seed=(0, 0)):
        """The loss, gradients and this batch's factors (no averaging, no damping).

        Args:
            theta: task values (list of tensors).
            phi: warp values.
            batch: ``(x, y)``.
            state: the model's non-trainable values (`None`: current).
            training: run the model in training mode.
            seed: int [2] seed of the sampled targets.

        Returns:
            ``(loss, gradients, new_state, outputs, A, G)``: A and G lists with one
            ``[dim_a, dim_a]`` / ``[dim_g, dim_g]`` matrix per block, in θ's dtype.
        """

        def loss_fn(values, step_batch):
            loss, new_state, outputs = obj.task_loss(
                self.partition,
                self.loss,
                values,
                phi,
                step_batch,
                state,
                training,
                return_outputs=True,
            )
            return loss, (new_state, outputs)

        loss, grads, (new_state, outputs), a_list, g_list = self.observe(
            loss_fn, theta, batch, seed
        )
        return loss, grads, new_state, outputs, a_list, g_list

    def observe(self, loss_fn, theta, batch, seed=(0, 0)):
        """The loss, gradients and this batch's factors of ``loss_fn(theta, batch)``.

        Args:
            loss_fn: ``loss_fn(theta, batch) -> (loss, aux)`` with ``aux[1]`` the model's
                predictions on ``batch`` (the form `warpkeras.rules.inner_step` passes).
            theta: task values (list of tensors).
            batch: ``(x, y)``.
            seed: int [2] seed of the sampled targets.

        Returns:
            ``(loss, gradients, aux, A, G)``.
        """
        theta = [tf.convert_to_tensor(t) for t in theta]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            with _capture(self.blocks) as records:
                loss, aux = loss_fn(theta, batch)
            terms = self._fisher_terms(split_batch(batch)[1], aux[1], seed)
        grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        dt = self.dtype
        a_list = []
        zs, shapes = [], []
        for b in self.blocks:
            calls = records[id(b.layer)]
            if not calls:
                a_list.append(tf.zeros([b.dim_a, b.dim_a], dt))
                shapes.append(None)
                continue
            a = tf.concat([tf.cast(_patches(b, x), dt) for x, _ in calls], axis=1)
            n = tf.cast(tf.shape(a)[0], dt)
            a_list.append(_outer(a) / n)
            zs.append([z for _, z in calls])
            shapes.append(len(calls))
        flat_z = [z for group in zs for z in group]
        g_acc = [tf.zeros([b.dim_g, b.dim_g], dt) for b in self.blocks]
        for term in terms:
            gz = tape.gradient(term, flat_z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            pos = 0
            for i, (b, count) in enumerate(zip(self.blocks, shapes)):
                if count is None:
                    continue
                parts = [
                    tf.reshape(tf.cast(g, dt), [tf.shape(g)[0], -1, b.dim_g])
                    for g in gz[pos : pos + count]
                ]
                pos += count
                g = tf.concat(parts, axis=1)
                n = tf.cast(tf.shape(g)[0], dt)
                locations = tf.cast(tf.shape(g)[1], dt)
                g_acc[i] = g_acc[i] + _outer(g) / (n * locations)
        del tape
        return loss, grads, aux, a_list, g_acc

    # -- inverses and preconditioning --------------------------------------------------------
    def damped_inverses(self, a, g):
        """(Ā + π √λ I)^{-1} and (G + (√λ / π) I)^{-1} (M&G Sec. 6.3) for one block.

        A non-finite factor gives NaN inverses (so the step is reported as diverged) rather
        than an error from the Cholesky factorisation.
        """
        dt = a.dtype
        da, dg = float(a.shape[-1]), float(g.shape[-1])
        tiny = np.finfo(dt.as_numpy_dtype).tiny
        root = tf.sqrt(tf.constant(self.config.damping, dt))
        if self.config.factored_damping:
            pi = tf.sqrt(
                tf.maximum(tf.reduce_sum(tf.linalg.diag_part(a)) / da, tiny)
                / tf.maximum(tf.reduce_sum(tf.linalg.diag_part(g)) / dg, tiny)
            )
        else:
            pi = tf.constant(1.0, dt)

        def inverse(m, shift):
            eye = tf.eye(m.shape[-1], dtype=dt)
            ok = tf.logical_and(tf.reduce_all(tf.math.is_finite(m)), tf.math.is_finite(shift))
            # A non-finite factor is replaced by I for the factorisation (which would fail
            # with an error), and the result by NaN. The Cholesky factorisation reads only
            # the lower triangle, so the factor is not symmetrised first (a transpose of a
            # 1x1 matrix inside `tf.cond` is mis-folded by TensorFlow's graph optimiser).
            sym = tf.where(ok, m + shift * eye, eye)
            inv = tf.linalg.cholesky_solve(tf.linalg.cholesky(sym), eye)
            return tf.where(ok, inv, tf.constant(np.nan, dt) * tf.ones_like(inv))

        return inverse(a, pi * root), inverse(g, root / pi)

    def precondition(self, grads, opt_state):
        """F̂^{-1} ∇L with the state's inverses: Ā^{-1} V G^{-1} per block, the gradient
        itself for the SGD variables.

        Returns:
            A list matching `grads`.
        """
        out = list(grads)
        for b, a_inv, g_inv in zip(self.blocks, opt_state["A_inv"], opt_state["G_inv"]):
            v = self._block_gradient(b, grads)
            u = tf.matmul(tf.matmul(a_inv, v), g_inv)
            self._split(b, u, out)
        return out

    def _block_gradient(self, b, grads):
        v = tf.reshape(grads[b.kernel_index], [b.d_in, b.d_out])
        if b.bias_index is not None:
            v = tf.concat([v, tf.reshape(grads[b.bias_index], [1, b.d_out])], axis=0)
        return v

    def _split(self, b, u, out):
        if b.bias_index is None:
            out[b.kernel_index] = tf.reshape(u, b.kernel_shape)
            return
        kernel, bias = tf.split(u, [b.d_in, 1], axis=0)
        out[b.kernel_index] = tf.reshape(kernel, b.kernel_shape)
        out[b.bias_index] = tf.reshape(bias, [b.d_out])

    # -- the step ----------------------------------------------------------------------------
    def step_seed(self, opt_state):
        """The int [2] seed of the sampled targets at the state's step."""
        return tf.stack([opt_state["seed"][0] * 1000003 + opt_state["seed"][1], opt_state["step"]])

    def step(self, theta, phi, batch, opt_state, state=None, training=True):
        """One K-FAC step θ_{k+1} = θ_k − α ν F̂^{-1} ∇L(θ_k) on `batch`.

        Pure and traceable: call it inside a `tf.function` (the optimiser state is an
        argument and a result, never a variable).

        Args:
            theta: θ_k (list of tensors in `partition.task_variables` order).
            phi: warp values (held fixed).
            batch: ``(x, y)``.
            opt_state: from `init` or the previous step.
            state: the model's non-trainable values (`None`: current).
            training: run the model in training mode.

        Returns:
            A `KFACStep`.
        """
        theta = [tf.convert_to_tensor(t) for t in theta]
        loss, grads, new_state, outputs, a_batch, g_batch = self.factors(
            theta, phi, batch, state, training, self.step_seed(opt_state)
        )
        new_theta, new_opt = self.update(theta, grads, a_batch, g_batch, opt_state)
        return KFACStep(new_theta, new_opt, loss, grads, new_state, outputs)

    def update(self, theta, grads, a_batch, g_batch, opt_state):
        """The step from the gradients and this batch's factors (`factors` / `observe`):
        running averages, damped inverses, preconditioning, the norm constraint.

        Returns:
            ``(theta_next, opt_state_next)``.
        """
        cfg = self.config
        k = opt_state["step"]
        dt = self.dtype
        kf = tf.cast(k + 1, dt)
        eps = tf.minimum(1.0 - 1.0 / kf, tf.constant(cfg.decay, dt))
        a_avg = tuple(eps * a + (1.0 - eps) * ab for a, ab in zip(opt_state["A"], a_batch))
        g_avg = tuple(eps * g + (1.0 - eps) * gb for g, gb in zip(opt_state["G"], g_batch))

        def recompute():
            pairs = [self.damped_inverses(a, g) for a, g in zip(a_avg, g_avg)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

        if not self.blocks:
            a_inv, g_inv = (), ()
        elif cfg.inverse_every == 1:
            a_inv, g_inv = recompute()
        else:
            a_inv, g_inv = tf.cond(
                tf.equal(k % cfg.inverse_every, 0),
                recompute,
                lambda: (tuple(opt_state["A_inv"]), tuple(opt_state["G_inv"])),
            )
        new_opt = {
            "step": k + 1,
            "seed": opt_state["seed"],
            "A": a_avg,
            "G": g_avg,
            "A_inv": tuple(a_inv),
            "G_inv": tuple(g_inv),
        }
        updates = self.precondition(grads, new_opt)
        lr = tf.constant(cfg.learning_rate, dt)
        if cfg.norm_constraint is not None:
            quad = tf.add_n(
                [tf.reduce_sum(tf.cast(u, dt) * tf.cast(g, dt)) for u, g in zip(updates, grads)]
            )
            nu = tf.minimum(
                tf.constant(1.0, dt),
                tf.sqrt(
                    tf.constant(cfg.norm_constraint, dt)
                    / tf.maximum(lr * lr * quad, np.finfo(np.float32).tiny)
                ),
            )
        else:
            nu = tf.constant(1.0, dt)
        new_theta = [
            t - tf.cast(lr * nu, t.dtype) * tf.cast(u, t.dtype) for t, u in zip(theta, updates)
        ]
        return new_theta, new_opt
