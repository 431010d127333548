"""`FitModel` (what `trainer.fit` hands to Keras callbacks) saves and loads the trainer's
own state beside the model's weights."""

import keras
import pytest
from conftest import plain_model

import warpkeras
from warpkeras.trainers.checkpoints import CheckpointError
from warpkeras.trainers.loop import FitModel


def _leap(meta_optimizer):
    return warpkeras.LeapTrainer(
        plain_model(),
        "mse",
        inner_steps=1,
        meta_batch_size=1,
        inner_learning_rate=0.1,
        meta_optimizer=meta_optimizer,
    )


def test_load_weights_of_a_differently_configured_trainer_names_the_file(tmp_path):
    path = str(tmp_path / "m.weights.h5")
    saved = FitModel(_leap(keras.optimizers.Adam(1e-3)))
    saved.save_weights(path)
    other = FitModel(_leap(keras.optimizers.SGD(0.1)))
    assert len(other.trainer._trainer_state_variables()) != len(
        saved.trainer._trainer_state_variables()
    )
    # the slots are stored by variable: the message names the file and the slots that only
    # one of the two trainers has (Adam's momentum and velocity)
    with pytest.raises(
        CheckpointError,
        match=r"trainer\.npz' was written by a differently "
        r"configured trainer: .*velocity",
    ):
        other.load_weights(path)
