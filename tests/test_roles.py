import keras
import numpy as np
import pytest

import warpkeras
from warpkeras import RoleError


def _names(variables):
    return ["/".join(v.path.split("/")[-2:]) for v in variables]


def _model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            warpkeras.task(keras.layers.Dense(5, name="t1")),
            warpkeras.warp(keras.layers.Dense(5, name="w1")),
            keras.layers.Dense(2, name="head"),
        ]
    )


def test_tag_returns_layer_and_role_is_readable():
    layer = keras.layers.Dense(3)
    assert warpkeras.warp(layer) is layer
    assert warpkeras.role_of(layer) == "warp"
    assert warpkeras.role_of(keras.layers.Dense(3)) is None
    # tagging again with the same role is fine
    warpkeras.warp(layer)


def test_tagging_twice_with_different_roles_names_the_layer():
    layer = warpkeras.task(keras.layers.Dense(3, name="my_dense"))
    with pytest.raises(RoleError, match="my_dense"):
        warpkeras.warp(layer)


def test_partition_groups_variables_by_role_and_untagged_policy():
    model = _model()
    p = warpkeras.partition(model)
    assert _names(p.warp_variables) == ["w1/kernel", "w1/bias"]
    # untagged head defaults to task
    assert _names(p.task_variables) == ["t1/kernel", "t1/bias", "head/kernel", "head/bias"]
    frozen = warpkeras.partition(model, untagged="frozen")
    assert _names(frozen.frozen_variables) == ["head/kernel", "head/bias"]
    as_warp = warpkeras.partition(model, untagged="warp")
    assert len(as_warp.warp_variables) == 4
    with pytest.raises(RoleError, match="head"):
        warpkeras.partition(model, untagged="error")


def test_partition_call_matches_model_and_uses_given_values():
    model = _model()
    p = warpkeras.partition(model)
    x = np.random.RandomState(0).randn(3, 4).astype("float32")
    y, _ = p.call(p.initial_task_values(), p.warp_values(), x)
    np.testing.assert_allclose(y, model(x), rtol=1e-6)
    zero_theta = [v * 0 for v in p.initial_task_values()]
    y0, _ = p.call(zero_theta, p.warp_values(), x)
    np.testing.assert_allclose(y0, np.zeros((3, 2)), atol=1e-7)


def test_innermost_tag_wins():
    inner = warpkeras.task(keras.layers.Dense(3, name="inner"))

    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.a = keras.layers.Dense(3, name="a")
            self.inner = inner

        def call(self, x):
            return self.inner(self.a(x))

    block = warpkeras.warp(Block(name="block"))
    model = keras.Sequential([keras.Input((3,)), block])
    p = warpkeras.partition(model)
    assert {v.path.split("/")[-2] for v in p.task_variables} == {"inner"}
    assert {v.path.split("/")[-2] for v in p.warp_variables} == {"a"}


def test_error_no_task_variables():
    model = keras.Sequential([keras.Input((2,)), warpkeras.warp(keras.layers.Dense(2))])
    with pytest.raises(RoleError, match="no task variables"):
        warpkeras.partition(model)


def test_error_no_warp_variables_when_required():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="only")])
    with pytest.raises(RoleError, match="no warp variables"):
        warpkeras.partition(model, require_warp=True)
    warpkeras.partition(model)  # fine when not required


def test_error_non_trainable_tagged_layer_names_it():
    frozen = warpkeras.warp(keras.layers.Dense(2, name="frozen_warp"))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), frozen])
    frozen.trainable = False
    with pytest.raises(RoleError, match="frozen_warp"):
        warpkeras.partition(model)


def test_error_unbuilt_model():
    with pytest.raises(ValueError, match="not built"):
        warpkeras.partition(keras.Sequential([keras.layers.Dense(2)]))


def _roles(model):
    return {layer.name: warpkeras.role_of(layer) for layer in model.layers}


def test_tags_survive_save_and_load(tmp_path):
    model = _model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert _roles(loaded) == {"t1": "task", "w1": "warp", "head": None}
    x = np.ones((1, 4), "float32")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_tags_survive_get_config_functional_and_sequential():
    inp = keras.Input((4,))
    h = warpkeras.task(keras.layers.Dense(3, name="ft"))(inp)
    out = warpkeras.warp(keras.layers.Dense(3, name="fw"))(h)
    functional = keras.Model(inp, out)
    clone = keras.Model.from_config(functional.get_config())
    assert _roles(clone)["fw"] == "warp" and _roles(clone)["ft"] == "task"
    seq = _model()
    clone = keras.Sequential.from_config(seq.get_config())
    assert _roles(clone) == {"t1": "task", "w1": "warp", "head": None}


def test_subclassed_model_without_training_argument():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = keras.layers.Dense(3, name="body")
            self.w = warpkeras.warp(keras.layers.Dense(3, name="w"))

        def call(self, x):
            return self.w(self.body(x))

    net = Net()
    x = np.ones((2, 4), "float32")
    net(x)
    p = warpkeras.partition(net, require_warp=True)
    y, _ = p.call(p.initial_task_values(), p.warp_values(), x, training=True)
    np.testing.assert_allclose(y, net(x), rtol=1e-6)
