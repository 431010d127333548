"""Task data that cannot feed the model is refused with a message naming the task, what it
holds and what the model takes, in `fit`, `evaluate` and `adapt`, instead of a graph error;
`evaluate` takes a single `Task`."""

import keras
import numpy as np
import pytest

import warpkeras

RNG = np.random.default_rng(0)
XA = RNG.normal(size=(20, 3)).astype("float32")
XB = RNG.normal(size=(20, 2)).astype("float32")
Y = RNG.integers(0, 3, 20)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], keras.layers.Dense(3)(h))


@pytest.fixture(scope="module")
def trainer():
    return warpkeras.LeapTrainer(_two_inputs(), loss=LOSS, inner_steps=2, meta_batch_size=1)


def test_evaluate_takes_one_task(trainer):
    task = warpkeras.Task(train=((XA, XB), Y), test=((XA, XB), Y), batch_size=5, name="one")
    report = trainer.evaluate(task, steps=2, verbose=0)
    assert report["tasks"] == 1 and np.isfinite(report["final_test_loss"]["mean"])


@pytest.mark.parametrize(
    "train, test, match",
    [
        ((XA, Y), None, r"Task 'bad': its train inputs do not fit .*number or nesting"),
        (
            ((XA, XA), Y),
            None,
            r"Task 'bad': its train inputs .*feature shape \(3,\) where the "
            r"model takes \(2,\)",
        ),
        (
            ((XA, XB), np.eye(3)[Y]),
            None,
            r"Task 'bad': its train labels have shape \(5, 3\), "
            r"one value per class \(one-hot\)",
        ),
        (((XA, XB), Y), (XA, XB), r"Task 'bad': its test inputs do not fit"),
    ],
)
def test_data_that_cannot_feed_the_model_is_named(trainer, train, test, match):
    task = warpkeras.Task(train=train, test=test, batch_size=5, name="bad")
    with pytest.raises(ValueError, match=match):
        trainer.evaluate([task], steps=1, verbose=0)
    if test is None:
        with pytest.raises(ValueError, match=match):
            trainer.fit([task], epochs=1, verbose=0)


def test_dict_keys_must_be_the_input_names():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(keras.layers.Concatenate()([a, b])))
    trainer = warpkeras.LeapTrainer(model, loss=LOSS, inner_steps=1, meta_batch_size=1)
    good = warpkeras.Task(train=({"a": XA, "b": XB}, Y), test=({"a": XA, "b": XB}, Y), batch_size=5)
    assert trainer.evaluate(good, steps=1, verbose=0)["tasks"] == 1
    bad = warpkeras.Task(train=({"a": XA, "c": XB}, Y), batch_size=5, name="keys")
    with pytest.raises(
        ValueError,
        match=r"Task 'keys'.*dict keys \['a', 'c'\] are not the "
        r"model's input names \['a', 'b'\]",
    ):
        trainer.evaluate(bad, steps=1, verbose=0)
