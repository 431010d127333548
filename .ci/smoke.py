"""Smoke test of an installed wheel or sdist, run outside the checkout.

Checks that warpkeras is imported from the installed files (not the source tree), that its
type marker and version are there, and that a model can be partitioned and meta-trained for
one meta step.
"""

import pathlib
import sys

import keras
import numpy as np

import warpkeras

location = pathlib.Path(warpkeras.__file__).resolve()
assert "site-packages" in location.parts, f"warpkeras imported from {location}"
assert (location.parent / "py.typed").is_file(), "py.typed is not installed"
assert warpkeras.__version__, "no version"

model = keras.Sequential(
    [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        warpkeras.layers.WarpDense(),
        keras.layers.Dense(1),
    ]
)
print(warpkeras.partition(model).summary())
rng = np.random.default_rng(0)


def make_task(rng):
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    return warpkeras.Task(train=(x[:30], y[:30]), test=(x[30:], y[30:]), batch_size=10)


trainer = warpkeras.WarpTrainer(
    model, "mse", inner_learning_rate=0.1, inner_steps=2, meta_batch_size=2, seed=0
)
history = trainer.fit(make_task, epochs=1, verbose=0)
loss = history.history["loss"][-1]
assert np.isfinite(loss), loss
print(
    f"smoke test passed: warpkeras {warpkeras.__version__} from {location.parent}, "
    f"one meta step, loss {loss:.4f}",
    file=sys.stderr,
)
