"""K-FAC (warpkeras.kfac) against closed forms: the exact natural gradient of a
linear-Gaussian model, a dense inverse of the damped Kronecker product, explicit patch
extraction for KFC, and adaptation through `MetaTrainer.evaluate`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.kfac import KFAC


def _dense_model(d_in, d_out, activation=None, bias=True):
    return keras.Sequential(
        [keras.Input((d_in,)), keras.layers.Dense(d_out, activation=activation, use_bias=bias)]
    )


def _exact_gauss_newton(p, theta, x, d_out):
    """(1/N) Σ_n J_n^T (2/D) J_n over [kernel; bias] (row-major), with J_n from autodiff:
    the Fisher of the Gaussian N(f, D/2 I) whose −log p is Keras's MSE."""
    rows = []
    for n in range(x.shape[0]):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            f = p.call(theta, [], x[n : n + 1])[0][0]
            outputs = [f[j] for j in range(d_out)]
        jac = []
        for fj in outputs:
            gk, gb = tape.gradient(fj, theta)
            jac.append(np.concatenate([gk.numpy(), gb.numpy()[None]], 0).ravel())
        rows.append(np.stack(jac))
    return sum(j.T @ j for j in rows) * (2.0 / d_out) / x.shape[0]


def test_linear_gaussian_step_is_the_exact_natural_gradient_step(float64):
    # One Dense layer with a Gaussian output of fixed isotropic variance: the Fisher is
    # E[ā ā^T] ⊗ (2/D) I exactly (the output Fisher does not depend on x), so K-FAC with the
    # exact expectation over targets is the natural-gradient step; with α = 1 it is the
    # Newton step of the quadratic loss and lands on the least-squares solution.
    rng = np.random.default_rng(0)
    n, d_in, d_out = 40, 4, 3
    x = rng.normal(size=(n, d_in)) * np.array([3.0, 1.0, 0.3, 0.1])
    y = rng.normal(size=(n, d_out))
    model = _dense_model(d_in, d_out)
    p = warpkeras.partition(model)
    theta = p.initial_task_values()
    loss = keras.losses.MeanSquaredError()
    with tf.GradientTape() as tape:
        tape.watch(theta)
        value = loss(y, p.call(theta, [], x)[0])
    grad = np.concatenate([g.numpy().reshape(-1, d_out) for g in tape.gradient(value, theta)])
    fisher = _exact_gauss_newton(p, theta, x, d_out)
    v0 = np.concatenate([t.numpy().reshape(-1, d_out) for t in theta])

    for lr in (0.3, 1.0):
        plan = KFAC(learning_rate=lr, damping=1e-20, fisher="exact").bind(p, loss)
        step = plan.step(theta, [], (x, y), plan.init())
        got = np.concatenate([t.numpy().reshape(-1, d_out) for t in step.theta])
        want = v0 - lr * np.linalg.solve(fisher, grad.ravel()).reshape(v0.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    xb = np.concatenate([x, np.ones((n, 1))], 1)
    np.testing.assert_allclose(got, np.linalg.lstsq(xb, y, rcond=None)[0], atol=1e-7)
    # The Kronecker factors themselves: A = E[ā ā^T], G = (2/D) I.
    _, _, _, _, a, g = plan.factors(theta, [], (x, y))
    np.testing.assert_allclose(a[0].numpy(), xb.T @ xb / n, rtol=1e-12)
    np.testing.assert_allclose(g[0].numpy(), np.eye(d_out) * 2.0 / d_out, rtol=1e-12)


def test_sampled_and_empirical_fisher_differ_from_exact_but_sampled_is_unbiased(float64):
    # On a softmax output the sampled G is an unbiased estimate of the exact one.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3))
    y = rng.integers(0, 4, size=400)
    model = _dense_model(3, 4)
    p = warpkeras.partition(model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    theta = p.initial_task_values()
    g = {}
    for mode in ("exact", "sampled", "empirical"):
        g[mode] = (
            KFAC(fisher=mode).bind(p, loss).factors(theta, [], (x, y), seed=(3, 0))[5][0].numpy()
        )
    # exact: E_n[diag(p) − p p^T]
    probs = tf.nn.softmax(model(x)).numpy()
    want = np.mean([np.diag(q) - np.outer(q, q) for q in probs], 0)
    np.testing.assert_allclose(g["exact"], want, rtol=1e-10, atol=1e-12)
    assert np.abs(g["sampled"] - want).max() < 0.05
    assert np.abs(g["sampled"] - want).max() > 1e-4  # a sample, not the expectation
    onehot = np.eye(4)[y]
    want_emp = np.mean([np.outer(q - t, q - t) for q, t in zip(probs, onehot)], 0)
    np.testing.assert_allclose(g["empirical"], want_emp, rtol=1e-10, atol=1e-12)


def test_factored_inverse_matches_dense_inverse_of_damped_kronecker(float64):
    rng = np.random.default_rng(2)
    model = _dense_model(2, 2)  # A is 3x3 (homogeneous coordinate), G is 2x2
    p = warpkeras.partition(model)
    damping = 0.05
    plan = KFAC(damping=damping).bind(p, "mse")
    ma, mg = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
    a, g = ma @ ma.T, 0.01 * mg @ mg.T  # very different scales: π matters
    v = rng.normal(size=(3, 2))
    a_inv, g_inv = plan.damped_inverses(tf.constant(a), tf.constant(g))
    state = dict(plan.init(), A_inv=(a_inv,), G_inv=(g_inv,))
    grads = [tf.constant(v[:2]), tf.constant(v[2])]
    u = plan.precondition(grads, state)
    got = np.concatenate([u[0].numpy(), u[1].numpy()[None]])
    pi = np.sqrt((np.trace(a) / 3) / (np.trace(g) / 2))
    root = np.sqrt(damping)
    dense = np.kron(a + pi * root * np.eye(3), g + root / pi * np.eye(2))
    want = np.linalg.solve(dense, v.ravel()).reshape(3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert pi > 5  # the test exercises the factored damping, not π = 1
    # without factored damping, π = 1
    plan1 = KFAC(damping=damping, factored_damping=False).bind(p, "mse")
    a_inv, g_inv = plan1.damped_inverses(tf.constant(a), tf.constant(g))
    dense = np.kron(a + root * np.eye(3), g + root * np.eye(2))
    np.testing.assert_allclose(
        (a_inv.numpy() @ v @ g_inv.numpy()),
        np.linalg.solve(dense, v.ravel()).reshape(3, 2),
        rtol=1e-10,
    )


@pytest.mark.parametrize(
    "strides,padding,dilation", [(1, "same", 1), (2, "valid", 1), (1, "same", 2)]
)
def test_conv_factors_match_explicit_patches(float64, strides, padding, dilation):
    rng = np.random.default_rng(3)
    n, h, w, cin, cout, k = 3, 5, 6, 2, 3, 3
    conv = keras.layers.Conv2D(
        cout, k, strides=strides, padding=padding, dilation_rate=dilation, activation="tanh"
    )
    model = keras.Sequential(
        [keras.Input((h, w, cin)), conv, keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    p = warpkeras.partition(model)
    x = rng.normal(size=(n, h, w, cin))
    y = rng.normal(size=(n, 2))
    theta = p.initial_task_values()
    plan = KFAC(fisher="empirical").bind(p, "mse")
    assert [b.kind for b in plan.blocks] == ["conv2d", "dense"]
    loss, grads, _, _, a, g = plan.factors(theta, [], (x, y))

    # Explicit patches with the layer's padding, stride and dilation.
    span = (k - 1) * dilation + 1
    if padding == "same":
        oh, ow = -(-h // strides), -(-w // strides)
        ph = max((oh - 1) * strides + span - h, 0)
        pw = max((ow - 1) * strides + span - w, 0)
        xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - span) // strides + 1, (w - span) // strides + 1
        xp = x
    patches = np.zeros((n, oh * ow, k * k * cin + 1))
    for i in range(oh):
        for j in range(ow):
            block = xp[
                :,
                i * strides : i * strides + span : dilation,
                j * strides : j * strides + span : dilation,
                :,
            ]
            patches[:, i * ow + j, :-1] = block.reshape(n, -1)
            patches[:, i * ow + j, -1] = 1.0
    want_a = np.einsum("nti,ntj->ij", patches, patches) / n
    np.testing.assert_allclose(a[0].numpy(), want_a, rtol=1e-10, atol=1e-12)

    # Pre-activation derivatives of Σ_n ℓ_n, computed with an explicit convolution.
    kernel, bias = theta[0], theta[1]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        z = tf.nn.conv2d(xt, kernel, strides, padding.upper(), dilations=dilation) + bias
        tape.watch(z)
        out = tf.reshape(tf.tanh(z), [n, -1]) @ theta[2] + theta[3]
        total = tf.reduce_sum(keras.losses.mean_squared_error(y, out))
    ds = tape.gradient(total, z).numpy().reshape(n, oh * ow, cout)
    want_g = np.einsum("nti,ntj->ij", ds, ds) / (n * oh * ow)
    np.testing.assert_allclose(g[0].numpy(), want_g, rtol=1e-10, atol=1e-14)
    # The patch layout matches the kernel layout: (1/N) Σ ā Ds^T is the gradient.
    vgrad = np.einsum("nti,ntj->ij", patches, ds) / n
    np.testing.assert_allclose(vgrad[:-1], grads[0].numpy().reshape(-1, cout), rtol=1e-9)
    np.testing.assert_allclose(vgrad[-1], grads[1].numpy(), rtol=1e-9)


class _CustomDense(keras.layers.Dense):
    def call(self, inputs, training=None):
        return super().call(inputs) * 1.0


def test_unfactored_variables_get_sgd_and_layers_are_restored(float64):
    rng = np.random.default_rng(4)
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="relu")(inp)
    h = keras.layers.LayerNormalization()(h)
    h = _CustomDense(3, name="custom")(h)
    out = keras.layers.Dense(2)(h)
    model = keras.Model(inp, out)
    p = warpkeras.partition(model)
    with pytest.warns(UserWarning, match="'custom' \\(overridden call\\)"):
        plan = KFAC(learning_rate=0.2).bind(p, "mse")
    # the layer norm's scale and offset, the custom layer's kernel and bias
    assert plan.sgd_indices == [2, 3, 4, 5]
    theta = p.initial_task_values()
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    step = plan.step(theta, [], (x, y), plan.init())
    for i in plan.sgd_indices:
        np.testing.assert_allclose(
            step.theta[i].numpy(), theta[i].numpy() - 0.2 * step.gradients[i].numpy()
        )
    # The factored kernels moved along something other than the gradient.
    sgd = theta[0].numpy() - 0.2 * step.gradients[0].numpy()
    assert np.abs(step.theta[0].numpy() - sgd).max() > 1e-3
    for layer in model.layers:
        assert "call" not in layer.__dict__
    assert model.layers[1].activation is keras.activations.relu


def test_running_averages_and_periodic_inverses(float64):
    rng = np.random.default_rng(5)
    model = _dense_model(3, 2)
    p = warpkeras.partition(model)
    plan = KFAC(decay=0.5, inverse_every=2, fisher="empirical", damping=1e-2).bind(p, "mse")
    theta = p.initial_task_values()
    batches = [(rng.normal(size=(6, 3)), rng.normal(size=(6, 2))) for _ in range(3)]
    state, a_batches = plan.init(), []
    inverses = []
    step_fn = tf.function(lambda th, b, s: plan.step(th, [], b, s))
    for b in batches:
        a_batches.append(plan.factors(theta, [], b)[4][0].numpy())
        step = step_fn(theta, b, state)
        theta, state = step.theta, step.opt_state
        inverses.append(state["A_inv"][0].numpy())
    # ε_1 = 0, ε_2 = min(1/2, 0.5), ε_3 = min(2/3, 0.5)
    want = a_batches[0]
    want = 0.5 * want + 0.5 * a_batches[1]
    want = 0.5 * want + 0.5 * a_batches[2]
    np.testing.assert_allclose(state["A"][0].numpy(), want, rtol=1e-10)
    np.testing.assert_array_equal(inverses[1], inverses[0])  # step 2 keeps them
    assert np.abs(inverses[2] - inverses[1]).max() > 1e-6  # step 3 recomputes
    want_inv, _ = plan.damped_inverses(state["A"][0], state["G"][0])
    np.testing.assert_allclose(inverses[2], want_inv.numpy(), rtol=1e-10)


def test_norm_constraint_bounds_the_update(float64):
    rng = np.random.default_rng(6)
    model = _dense_model(3, 2)
    p = warpkeras.partition(model)
    x, y = rng.normal(size=(10, 3)), 10 * rng.normal(size=(10, 2))
    theta = p.initial_task_values()
    free = KFAC(learning_rate=1.0).bind(p, "mse")
    step = free.step(theta, [], (x, y), free.init())
    precond = free.precondition(step.gradients, step.opt_state)
    quad = sum(float(tf.reduce_sum(u * g)) for u, g in zip(precond, step.gradients))
    c = quad / 100.0
    clipped = KFAC(learning_rate=1.0, norm_constraint=c).bind(p, "mse")
    step_c = clipped.step(theta, [], (x, y), clipped.init())
    for t0, t1, tc in zip(theta, step.theta, step_c.theta):
        np.testing.assert_allclose((tc - t0).numpy(), 0.1 * (t1 - t0).numpy(), rtol=1e-8)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        KFAC(learning_rate=0.0)
    with pytest.raises(ValueError, match="damping"):
        KFAC(damping=-1.0)
    with pytest.raises(ValueError, match="fisher"):
        KFAC(fisher="true")
    with pytest.raises(ValueError, match="decay"):
        KFAC(decay=1.0)
    model = _dense_model(2, 2)
    p = warpkeras.partition(model)
    with pytest.raises(ValueError, match="fisher='empirical'"):
        KFAC().bind(p, keras.losses.Huber())
    KFAC(fisher="empirical").bind(p, keras.losses.Huber())
    trainer = warpkeras.NoMetaTrainer(model, loss="mse", inner_steps=1)
    task = warpkeras.Task((np.ones((4, 2)), np.ones((4, 2))), batch_size=4)
    with pytest.raises(TypeError, match="inner_optimizer"):
        trainer.adapt(task, inner_optimizer="kfac")


def test_evaluate_with_kfac_beats_sgd_per_step_on_ill_conditioned_regression():
    # Inputs scaled 1 : 0.05, so the loss's curvature spans 400x: SGD at a learning rate
    # that is stable in the steep direction crawls along the flat one; K-FAC rescales both.
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(64, 2)) * np.array([1.0, 0.05])).astype("float32")
    w = np.array([[1.0], [-20.0]], dtype="float32")
    y = x @ w
    task = warpkeras.Task((x, y), test=(x, y), batch_size=64, name="ill-conditioned")
    keras.utils.set_random_seed(0)
    model = _dense_model(2, 1, bias=False)
    trainer = warpkeras.NoMetaTrainer(model, loss="mse", inner_learning_rate=0.5, inner_steps=10)
    sgd = trainer.evaluate([task], verbose=0)
    kfac = trainer.evaluate(
        [task], verbose=0, inner_optimizer=KFAC(learning_rate=0.5, damping=1e-6)
    )
    sgd_curve = sgd["curves"][0]["train_loss"]
    kfac_curve = kfac["curves"][0]["train_loss"]
    assert sgd_curve[0] == pytest.approx(kfac_curve[0])  # same start
    assert kfac["final_test_loss"]["mean"] < 1e-3 * sgd["final_test_loss"]["mean"]
    assert all(k < s for k, s in zip(kfac_curve[1:], sgd_curve[1:]))
    # θ0 is untouched by the adaptation.
    np.testing.assert_array_equal(
        trainer.model.layers[0].kernel.numpy(), model.layers[0].kernel.numpy()
    )


@pytest.mark.parametrize("inverse_every", [1, 2])
def test_compiled_step_matches_eager_with_one_output_unit(inverse_every):
    # 1x1 factors inside tf.function (a graph-optimiser folding of 1x1 transposes once
    # returned empty inverses here).
    rng = np.random.default_rng(8)
    model = _dense_model(3, 1)
    p = warpkeras.partition(model)
    plan = KFAC(inverse_every=inverse_every, fisher="empirical").bind(p, "mse")
    x, y = rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    theta = p.initial_task_values()
    eager = plan.step(theta, [], (x, y), plan.init())
    compiled = tf.function(lambda th, s: plan.step(th, [], (x, y), s))(theta, plan.init())
    for a, b in zip(
        tf.nest.flatten((eager.theta, eager.opt_state)),
        tf.nest.flatten((compiled.theta, compiled.opt_state)),
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_kfac_compiles_with_xla(float64):
    # jit_compile=True: the exact Fisher gives the same steps as the plain graph; the
    # sampled one (Gumbel-max targets, since XLA has no categorical sampler) is
    # deterministic and learns.
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(24, 3)), rng.integers(0, 3, size=24)
    model = _dense_model(3, 3, activation="softmax")
    task = warpkeras.Task((x, y), batch_size=24)
    plain = warpkeras.NoMetaTrainer(model, "sparse_categorical_crossentropy", inner_steps=3)
    jit = warpkeras.NoMetaTrainer(
        model, "sparse_categorical_crossentropy", inner_steps=3, jit_compile=True
    )
    runs = {}
    for fisher, trainers in (("exact", (plain, jit)), ("sampled", (jit, jit))):
        kfac = KFAC(learning_rate=0.5, fisher=fisher)
        for trainer in trainers:
            runs.setdefault((fisher, trainer.jit_compile), []).append(
                trainer.adapt(task, inner_optimizer=kfac)[1]["train_loss"]
            )
    np.testing.assert_allclose(runs["exact", True][0], runs["exact", False][0], rtol=1e-9)
    assert runs["sampled", True][0] == runs["sampled", True][1]
    assert runs["sampled", True][0][-1] < runs["sampled", True][0][0]


def test_warp_layers_are_not_factored_but_shape_the_curvature():
    # The Dense layers inside a residual warp hold warp variables φ: K-FAC leaves them out,
    # and the task layer's G factor sees the warp through the backward pass.
    rng = np.random.default_rng(10)
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="task_in")(inp)
    h = warpkeras.layers.ResidualWarpDense(hidden_units=5, name="warp")(h)
    out = keras.layers.Dense(2, name="task_out")(h)
    model = keras.Model(inp, out)
    p = warpkeras.partition(model, require_warp=True)
    plan = KFAC(fisher="exact").bind(p, "mse")
    assert [b.name for b in plan.blocks] == ["task_in", "task_out"]
    assert plan.sgd_indices == []
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    theta, phi = p.initial_task_values(), p.warp_values()
    g_identity = plan.factors(theta, phi, (x, y))[5][0]
    phi2 = [v + 0.5 * rng.normal(size=v.shape).astype("float32") for v in phi]
    g_warped = plan.factors(theta, phi2, (x, y))[5][0]
    assert np.abs(g_warped.numpy() - g_identity.numpy()).max() > 1e-3


def test_dense_on_sequences_and_shared_layers_sum_over_locations_and_uses(float64):
    # A Dense layer on [N, T, d] inputs, applied twice (shared weights): each time step and
    # each use is a location of the KFC factorisation.
    rng = np.random.default_rng(11)
    n, t, d = 5, 4, 3
    shared = keras.layers.Dense(2, name="shared")
    inp = keras.Input((t, d))
    h = keras.layers.Add()([shared(inp), shared(keras.layers.Rescaling(2.0)(inp))])
    model = keras.Model(inp, keras.layers.Flatten()(h))
    p = warpkeras.partition(model)
    plan = KFAC(fisher="empirical").bind(p, "mse")
    x, y = rng.normal(size=(n, t, d)), rng.normal(size=(n, 2 * t))
    theta = p.initial_task_values()
    _, grads, _, _, a, g = plan.factors(theta, [], (x, y))
    xb = np.concatenate(
        [
            np.concatenate([x, np.ones((n, t, 1))], -1),
            np.concatenate([2 * x, np.ones((n, t, 1))], -1),
        ],
        1,
    )  # [N, 2T, d+1]
    np.testing.assert_allclose(a[0].numpy(), np.einsum("nti,ntj->ij", xb, xb) / n, rtol=1e-12)
    kernel, bias = theta
    with tf.GradientTape(persistent=True) as tape:
        z1 = tf.constant(x) @ kernel + bias
        z2 = tf.constant(2 * x) @ kernel + bias
        tape.watch([z1, z2])
        total = tf.reduce_sum(keras.losses.mean_squared_error(y, tf.reshape(z1 + z2, [n, -1])))
    ds = np.concatenate([tape.gradient(total, z1).numpy(), tape.gradient(total, z2).numpy()], 1)
    np.testing.assert_allclose(
        g[0].numpy(), np.einsum("nti,ntj->ij", ds, ds) / (n * 2 * t), rtol=1e-10
    )
    np.testing.assert_allclose(
        np.einsum("nti,ntj->ij", xb, ds)[:-1] / n, grads[0].numpy(), rtol=1e-10
    )
