"""Every bad constructor argument is refused at construction with a message naming it.

Table-driven: each row is (argument, bad value, expected exception, regex the message must
match). The regexes require the argument's name and, for most rows, the fix offered
("expected ...", "e.g. ..."). Covered: every constructor argument of the trainers
(`MetaTrainer` and its front-ends), `Task`, `ClassificationTask`, `WarpGrad` and
`LeapCallback`, plus `fit(meta_steps=...)`, label ranges during training and the
identifiers `keras.optimizers.get` accepts.
"""

import math
import re

import keras
import numpy as np
import pytest

import warpkeras
from warpkeras import _validation as v
from warpkeras.data import ClassificationTask
from warpkeras.trainers import MetaTrainer

LOSS = "sparse_categorical_crossentropy"


class _File:
    """Placeholder for the path of an existing file (made per test); its fixed repr keeps
    the test ids the same in every process."""

    def __repr__(self):
        return "FILE"


FILE = _File()


@pytest.fixture(scope="module")
def model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="tanh"),
            warpkeras.layers.WarpDense(),
            keras.layers.Dense(3),
        ]
    )


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spill") / "not-a-folder"
    path.write_text("a file, not a folder")
    return str(path)


def _value(value, a_file):
    return a_file if value is FILE else value


def _message_check(excinfo, regex):
    """Short enough to read (no graph dump)."""
    text = str(excinfo.value)
    assert len(text) < 600, f"message too long ({len(text)} characters): {text[:200]}..."


# --------------------------------------------------------------------------------------------
# trainers

# Arguments of `MetaTrainer.__init__` (shared by every front-end through **kwargs).
COMMON = [
    ("init_weight", "one", TypeError, r"init_weight='one'.*expected a finite number"),
    ("init_weight", -1.0, ValueError, r"init_weight=-1\.0.*>= 0"),
    ("init_weight", math.nan, ValueError, r"init_weight=nan.*finite"),
    ("inner_learning_rate", "fast", TypeError, r"inner_learning_rate='fast'.*e\.g\."),
    ("inner_learning_rate", "0.1", TypeError, r"inner_learning_rate=.*not a string"),
    ("inner_learning_rate", -0.05, ValueError, r"inner_learning_rate=-0\.05.*> 0"),
    ("inner_learning_rate", 0.0, ValueError, r"inner_learning_rate=0\.0.*> 0"),
    ("inner_learning_rate", math.nan, ValueError, r"inner_learning_rate=nan.*finite"),
    ("inner_learning_rate", math.inf, ValueError, r"inner_learning_rate=inf.*finite"),
    ("inner_learning_rate", True, TypeError, r"inner_learning_rate=True"),
    ("inner_learning_rate", [0.1], TypeError, r"inner_learning_rate=\[0\.1\]"),
    ("inner_momentum", "high", TypeError, r"inner_momentum='high'.*e\.g\. inner_momentum=0\.9"),
    ("inner_momentum", 1.5, ValueError, r"inner_momentum=1\.5.*< 1"),
    ("inner_momentum", -0.1, ValueError, r"inner_momentum=-0\.1.*>= 0"),
    (
        "learn_inner_learning_rate",
        "yes",
        TypeError,
        r"learn_inner_learning_rate='yes'.*True or False",
    ),
    ("learn_inner_momentum", 1, TypeError, r"learn_inner_momentum=1.*True or False"),
    ("hyper_learning_rate", "x", TypeError, r"hyper_learning_rate='x'"),
    ("hyper_learning_rate", -1.0, ValueError, r"hyper_learning_rate=-1\.0.*>= 0"),
    ("hyper_clip", "x", TypeError, r"hyper_clip='x'"),
    ("hyper_clip", 0.0, ValueError, r"hyper_clip=0\.0.*> 0"),
    (
        "inner_steps",
        "five",
        TypeError,
        r"inner_steps='five'.*an integer >= 1.*e\.g\. inner_steps=5",
    ),
    ("inner_steps", "5", TypeError, r"inner_steps='5'.*not a string: inner_steps=5"),
    ("inner_steps", 0, ValueError, r"inner_steps=0.*>= 1"),
    ("inner_steps", 2.5, TypeError, r"inner_steps=2\.5.*integer"),
    ("inner_steps", True, TypeError, r"inner_steps=True.*integer"),
    ("meta_batch_size", 0, ValueError, r"meta_batch_size=0.*>= 1"),
    ("meta_batch_size", "5", TypeError, r"meta_batch_size='5'"),
    (
        "meta_optimizer",
        "adamm",
        ValueError,
        r"meta_optimizer='adamm'.*optimizer name such as 'adam'",
    ),
    ("meta_optimizer", 3, TypeError, r"meta_optimizer=3.*keras\.optimizers\.Optimizer"),
    (
        "meta_optimizer",
        keras.optimizers.Adam,
        TypeError,
        r"meta_optimizer=.*pass an instance: meta_optimizer=Adam\(\)",
    ),
    ("init_optimizer", "sgdd", ValueError, r"init_optimizer='sgdd'"),
    ("init_optimizer", 0.1, TypeError, r"init_optimizer=0\.1"),
    ("meta_interval", "5", TypeError, r"meta_interval='5'"),
    ("meta_interval", 0, ValueError, r"meta_interval=0.*>= 1"),
    ("max_warp_updates", "all", TypeError, r"max_warp_updates='all'"),
    ("max_warp_updates", 0, ValueError, r"max_warp_updates=0.*>= 1"),
    (
        "warp_gradient_reduction",
        "average",
        ValueError,
        r"warp_gradient_reduction='average'.*'mean', 'sum'",
    ),
    ("warp_gradient_reduction", "Sum", ValueError, r"did you mean warp_gradient_reduction='sum'"),
    ("buffer_final_point", "yes", TypeError, r"buffer_final_point='yes'.*True or False"),
    ("buffer_capacity", "big", TypeError, r"buffer_capacity='big'"),
    ("buffer_capacity", 0, ValueError, r"buffer_capacity=0.*>= 1"),
    ("buffer_overflow", "drop", ValueError, r"buffer_overflow='drop'.*'reservoir', 'spill'"),
    ("buffer_spill_dir", FILE, ValueError, r"buffer_spill_dir=.*a file of that name exists"),
    ("buffer_spill_dir", 5, TypeError, r"buffer_spill_dir=5.*folder path"),
    ("leap_norm", "l2", ValueError, r"leap_norm='l2'.*'length', 'energy'"),
    ("leap_sign_correction", "no", TypeError, r"leap_sign_correction='no'"),
    ("leap_loss_in_path", None, TypeError, r"leap_loss_in_path=None"),
    ("meta_loss", "mse", TypeError, r"meta_loss='mse'.*callable"),
    ("accuracy", "yes", TypeError, r"accuracy='yes'.*True or False or None"),
    ("head_layers", "last", TypeError, r"head_layers='last'.*head_layers=\[model\.layers\[-1\]\]"),
    ("head_layers", [3], TypeError, r"head_layers=\[3\]"),
    ("untagged", "ignore", ValueError, r"untagged='ignore'.*'task', 'warp', 'frozen', 'error'"),
    ("eval_training_mode", "False", TypeError, r"eval_training_mode='False'.*True or False"),
    ("jit_compile", 1, TypeError, r"jit_compile=1.*True or False"),
    ("parallel", "threads", ValueError, r"parallel='threads'.*'sequential'"),
    ("parallel", "vectorised", ValueError, r"did you mean parallel='vectorized'"),
    ("strategy", "mirrored", TypeError, r"strategy='mirrored'.*tf\.distribute\.Strategy"),
    ("group_size", "4", TypeError, r"group_size='4'.*group_size=4"),
    ("group_size", 0, ValueError, r"group_size=0.*>= 1"),
    ("seed", "abc", TypeError, r"seed='abc'.*an integer >= 0.*e\.g\. seed=0"),
    ("seed", -1, ValueError, r"seed=-1.*>= 0"),
    ("seed", 1.5, TypeError, r"seed=1\.5"),
]

# Arguments `MetaTrainer` takes but each front-end fixes itself (passing them is an error).
FIXED = {
    "WarpTrainer": {"warp_mode", "warp_objective"},
    "LeapTrainer": {
        "warp_mode",
        "init_objective",
        "leap_norm",
        "leap_sign_correction",
        "leap_loss_in_path",
    },
    "MAMLTrainer": {"warp_mode", "init_objective"},
    "ReptileTrainer": {"warp_mode", "init_objective"},
    "FineTuneTrainer": {"warp_mode", "init_objective"},
    "NoMetaTrainer": {"warp_mode", "init_objective"},
    "MetaTrainer": set(),
}

# Rows for the arguments only the base class or one front-end takes.
OWN = {
    "MetaTrainer": [
        ("warp_mode", "onlin", ValueError, r"warp_mode='onlin'.*did you mean warp_mode='online'"),
        ("warp_mode", True, ValueError, r"warp_mode=True.*one of None, 'online'"),
        ("warp_objective", "exactly", ValueError, r"warp_objective='exactly'.*'exact', 'approx'"),
        ("init_objective", "leapp", ValueError, r"init_objective='leapp'.*'leap'"),
        ("objectives", "leap", TypeError, r"objectives='leap'.*warpkeras\.meta\.MetaObjective"),
        (
            "objectives",
            [warpkeras.meta.Leap()],
            ValueError,
            r"init_objective, warp_mode choose objectives, but objectives= is given",
        ),
        (
            "group_size",
            4,
            ValueError,
            r"group_size=4.*parallel='sequential' adapts one task",
            {"parallel": "sequential"},
        ),
    ],
    "WarpTrainer": [
        ("mode", "onlin", ValueError, r"WarpTrainer: mode='onlin'.*did you mean mode='online'"),
        ("mode", None, ValueError, r"mode=None.*'online', 'offline', 'continual'"),
        ("objective", "second-order", ValueError, r"objective='second-order'.*'exact', 'approx'"),
        (
            "init_objective",
            "MAML",
            ValueError,
            r"init_objective='MAML'.*did you mean init_objective='maml'",
        ),
    ],
    "LeapTrainer": [
        ("norm", "l2", ValueError, r"LeapTrainer: norm='l2'.*'length', 'energy'"),
        ("sign_correction", "yes", TypeError, r"sign_correction='yes'.*True or False"),
        ("loss_in_path", 0, TypeError, r"loss_in_path=0.*True or False"),
    ],
    "MAMLTrainer": [
        ("first_order", "yes", TypeError, r"MAMLTrainer: first_order='yes'.*True or False"),
        ("unroll", "yes", TypeError, r"MAMLTrainer: unroll='yes'.*True or False"),
        ("recompute", "yes", TypeError, r"MAMLTrainer: recompute='yes'.*True or False"),
    ],
    "ReptileTrainer": [],
    "FineTuneTrainer": [
        ("multi_headed", "yes", TypeError, r"multi_headed='yes'.*True or False"),
        (
            "head_layers",
            None,
            ValueError,
            r"head_layers=\[\.\.\.\].*multi_headed=False",
            {"multi_headed": True},
        ),
    ],
    "NoMetaTrainer": [],
}

# Valid keyword arguments each trainer needs besides model and loss.
BASE_KWARGS = {
    "MetaTrainer": {"warp_mode": "online", "init_objective": "leap"},
    "WarpTrainer": {"mode": "online"},
    "LeapTrainer": {},
    "MAMLTrainer": {},
    "ReptileTrainer": {},
    "FineTuneTrainer": {"multi_headed": False},
    "NoMetaTrainer": {},
}


def _readable(value):
    """`repr(value)` without memory addresses, so that every test process (pytest-xdist)
    collects the same test ids."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _trainer_rows():
    rows = []
    for name, fixed in FIXED.items():
        for arg, value, exc, regex, *extra in OWN[name]:
            rows.append(
                pytest.param(
                    name,
                    arg,
                    value,
                    exc,
                    regex,
                    *(extra or [{}]),
                    id=f"{name}-{arg}-{_readable(value)}",
                )
            )
        for arg, value, exc, regex in COMMON:
            if arg not in fixed:
                rows.append(
                    pytest.param(
                        name, arg, value, exc, regex, {}, id=f"{name}-{arg}-{_readable(value)}"[:80]
                    )
                )
        for arg in sorted(fixed):
            rows.append(
                pytest.param(
                    name,
                    arg,
                    None,
                    TypeError,
                    rf"multiple values for keyword argument '{arg}'",
                    {},
                    id=f"{name}-fixed-{arg}",
                )
            )
    return rows


def _trainer_class(name):
    return MetaTrainer if name == "MetaTrainer" else getattr(warpkeras, name)


@pytest.mark.parametrize("trainer,arg,value,exc,regex,extra", _trainer_rows())
def test_trainer_argument_refused(model, a_file, trainer, arg, value, exc, regex, extra):
    kwargs = dict(BASE_KWARGS[trainer], **extra)
    kwargs[arg] = _value(value, a_file)
    with pytest.raises(exc, match=regex) as excinfo:
        _trainer_class(trainer)(model, LOSS, **kwargs)
    _message_check(excinfo, regex)


@pytest.mark.parametrize("trainer", sorted(FIXED))
@pytest.mark.parametrize(
    "value,exc,regex",
    [
        ("not a model", TypeError, r"model='not a model'.*keras\.Model"),
        (None, TypeError, r"model=None.*keras\.Model"),
    ],
)
def test_trainer_model_refused(trainer, value, exc, regex):
    with pytest.raises(exc, match=regex):
        _trainer_class(trainer)(value, LOSS, **BASE_KWARGS[trainer])


@pytest.mark.parametrize("trainer", sorted(FIXED))
@pytest.mark.parametrize(
    "value,exc,regex",
    [
        ("cross_entropy", ValueError, r"loss='cross_entropy'.*Keras loss name"),
        (3, TypeError, r"loss=3.*callable"),
        (None, ValueError, r"a loss is required.*loss='sparse_categorical_crossentropy'"),
        ({"class_name": "NoSuchLoss", "config": {}}, ValueError, r"loss=.*NoSuchLoss"),
    ],
)
def test_trainer_loss_refused(model, trainer, value, exc, regex):
    with pytest.raises(exc, match=regex):
        _trainer_class(trainer)(model, value, **BASE_KWARGS[trainer])


def test_same_optimizer_for_warp_and_init_refused(model):
    sgd = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="meta_optimizer and init_optimizer are the same"):
        warpkeras.WarpTrainer(model, LOSS, mode="online", meta_optimizer=sgd, init_optimizer=sgd)


def test_fit_meta_steps_string_refused(model):
    trainer = warpkeras.ReptileTrainer(model, LOSS, inner_steps=1, meta_batch_size=1)
    task = warpkeras.Task(train=(np.zeros((4, 4), "float32"), np.zeros(4, "int32")))
    with pytest.raises(TypeError, match=r"meta_steps.*'10'.*meta_steps=10"):
        trainer.fit([task], meta_steps="10", verbose=0)
    assert int(trainer.step.numpy()) == 0


# --------------------------------------------------------------------------------------------
# valid values keep working


@pytest.mark.parametrize(
    "identifier,cls,lr",
    [
        ("adam", keras.optimizers.Adam, 0.001),
        ("SGD", keras.optimizers.SGD, 0.01),
        ({"class_name": "SGD", "config": {"learning_rate": 0.25}}, keras.optimizers.SGD, 0.25),
        (keras.optimizers.serialize(keras.optimizers.RMSprop(0.5)), keras.optimizers.RMSprop, 0.5),
    ],
)
def test_optimizer_identifiers_accepted(model, identifier, cls, lr):
    trainer = warpkeras.WarpTrainer(
        model, LOSS, mode="online", meta_optimizer=identifier, init_optimizer=identifier
    )
    for opt in (trainer.meta_optimizer, trainer.init_optimizer):
        assert type(opt) is cls
        assert float(opt.learning_rate.numpy()) == pytest.approx(lr)
    assert trainer.meta_optimizer is not trainer.init_optimizer
    leap = warpkeras.LeapTrainer(model, LOSS, meta_optimizer=identifier)
    assert type(leap.init_optimizer) is cls
    wg = warpkeras.WarpGrad(inner_optimizer=identifier, meta_optimizer=identifier)
    assert type(wg.inner_optimizer) is cls and type(wg.meta_optimizer) is cls
    cb = warpkeras.LeapCallback(meta_optimizer=identifier)
    assert type(cb.meta_optimizer) is cls


def test_numpy_scalars_accepted(model, tmp_path):
    trainer = warpkeras.WarpTrainer(
        model,
        LOSS,
        mode="offline",
        inner_steps=np.int64(3),
        meta_batch_size=np.int32(2),
        inner_learning_rate=np.float32(0.25),
        inner_momentum=np.float64(0.5),
        seed=np.int64(7),
        jit_compile=np.bool_(False),
        buffer_capacity=np.int64(10),
        buffer_spill_dir=str(tmp_path / "new" / "folder"),
    )
    assert (trainer.inner_steps, trainer.meta_batch_size, trainer.seed) == (3, 2, 7)
    assert type(trainer.inner_steps) is int and type(trainer.seed) is int
    assert float(trainer.inner_lr.numpy()) == pytest.approx(0.25)
    assert not (tmp_path / "new").exists()  # nothing is created at construction
    task = warpkeras.Task(train=(np.zeros((4, 4)), np.zeros(4)), batch_size=np.int64(2))
    assert task.batch_size == 2 and type(task.batch_size) is int


# --------------------------------------------------------------------------------------------
# Task

X = np.arange(40, dtype="float32").reshape(10, 4)
Y = np.arange(10) % 3

TASK_ROWS = [
    (
        "train",
        "x",
        TypeError,
        r"Task 'task': `train` must be \(x, y\) or \(x, y, sample_weight\) arrays.*got str",
    ),
    (
        "train",
        (X, Y[:7]),
        ValueError,
        r"arrays of `train` differ in their number of rows \(x has 10, y has 7\)",
    ),
    ("train", (X[:0], Y[:0]), ValueError, r"`train` has no examples"),
    ("meta", 5, TypeError, r"`meta` must be"),
    (
        "meta",
        (X, Y[:3]),
        ValueError,
        r"arrays of `meta` differ in their number of rows \(x has 10, y has 3\)",
    ),
    ("meta", (X[:0], Y[:0]), ValueError, r"`meta` has no examples"),
    (
        "test",
        (X[:4], Y[:2]),
        ValueError,
        r"arrays of `test` differ in their number of rows \(x has 4, y has 2\)",
    ),
    ("test", "held-out", TypeError, r"test='held-out'.*\(x, y\).*arrays"),
    ("batch_size", -5, ValueError, r"batch_size=-5.*an integer >= 1.*e\.g\. batch_size=32"),
    ("batch_size", 0, ValueError, r"batch_size=0.*>= 1"),
    ("batch_size", "32", TypeError, r"batch_size='32'.*not a string: batch_size=32"),
    ("batch_size", 2.5, TypeError, r"batch_size=2\.5.*integer"),
    ("batch_size", None, TypeError, r"batch_size=None.*integer"),
    ("augment", "flip", TypeError, r"augment='flip'.*callable augment\(x, rng\) -> x"),
    ("name", 5, TypeError, r"name=5.*string"),
    ("info", [1, 2], TypeError, r"info=\[1, 2\].*dict"),
]


@pytest.mark.parametrize(
    "arg,value,exc,regex", TASK_ROWS, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(TASK_ROWS)]
)
def test_task_argument_refused(arg, value, exc, regex):
    kwargs = {"train": (X, Y)}
    kwargs[arg] = value
    with pytest.raises(exc, match=regex) as excinfo:
        warpkeras.Task(**kwargs)
    _message_check(excinfo, regex)


def test_task_error_names_the_task():
    with pytest.raises(ValueError, match=r"Task 'alphabet-3': batch_size=0"):
        warpkeras.Task(train=(X, Y), batch_size=0, name="alphabet-3")


# --------------------------------------------------------------------------------------------
# ClassificationTask

CT_ROWS = [
    ("x_train", "pixels", TypeError, r"x_train is not valid: expected a numeric array"),
    ("x_train", np.full((6, 2), np.nan), ValueError, r"x_train holds 12 NaN or infinite"),
    ("x_train", np.zeros((0, 2)), ValueError, r"x_train has 0 rows but y_train has 6"),
    ("x_train", 1.0, ValueError, r"x_train is a scalar"),
    ("y_train", np.zeros((6, 2), "int32"), ValueError, r"y_train must be a 1-D.*y\.argmax"),
    ("y_train", np.full(6, 0.5), ValueError, r"y_train holds non-integer labels"),
    ("y_train", ["a"] * 6, TypeError, r"y_train is not valid: expected integer class ids"),
    ("y_train", np.ones(6, bool), TypeError, r"y_train is not valid"),
    ("y_train", np.arange(5), ValueError, r"x_train has 6 rows but y_train has 5"),
    ("x_test", np.zeros((3, 2)), ValueError, r"x_test has 3 rows but y_test has 2"),
    ("x_test", np.zeros((2, 5)), ValueError, r"x_test rows have shape \(5,\)"),
    ("x_test", np.array([[np.inf, 0.0], [0.0, 0.0]]), ValueError, r"x_test holds 1 NaN"),
    ("y_test", np.array([0.0, np.nan]), ValueError, r"y_test holds non-integer labels"),
    ("y_test", np.array([0, 1, 2]), ValueError, r"x_test has 2 rows but y_test has 3"),
    ("num_classes", "3", TypeError, r"num_classes='3'.*not a string: num_classes=3"),
    (
        "num_classes",
        2,
        ValueError,
        r"labels must lie in \[0, 2\) \(num_classes=2\).*raise num_classes",
    ),
    ("num_classes", 0, ValueError, r"num_classes=0.*>= 1"),
    ("name", 3, TypeError, r"name=3.*string"),
    ("class_names", "abc", TypeError, r"class_names='abc'.*list of names"),
    ("class_names", ["a"], ValueError, r"class_names has 1 entries for 3 classes"),
    ("augmentation", 3, TypeError, r"augmentation=3.*callable f\(images, seed\) -> images"),
]


@pytest.mark.parametrize(
    "arg,value,exc,regex", CT_ROWS, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(CT_ROWS)]
)
def test_classification_task_argument_refused(arg, value, exc, regex):
    kwargs = dict(
        x_train=np.zeros((6, 2)),
        y_train=np.arange(6) % 3,
        x_test=np.zeros((2, 2)),
        y_test=np.array([0, 2]),
    )
    kwargs[arg] = value
    with pytest.raises(exc, match=regex) as excinfo:
        ClassificationTask(**kwargs)
    _message_check(excinfo, regex)


@pytest.mark.parametrize(
    "method,kwargs,exc,regex",
    [
        ("to_task", {"batch_size": 0}, ValueError, r"to_task: batch_size=0"),
        ("to_task", {"augment": "yes"}, TypeError, r"to_task: augment='yes'"),
        ("train_dataset", {"batch_size": "20"}, TypeError, r"train_dataset: batch_size='20'"),
        ("train_dataset", {"seed": "abc"}, TypeError, r"train_dataset: seed='abc'"),
        ("train_dataset", {"shuffle": "no"}, TypeError, r"shuffle='no'"),
        ("train_dataset", {"repeat": 0}, TypeError, r"repeat=0"),
        ("train_dataset", {"drop_remainder": None}, TypeError, r"drop_remainder=None"),
        ("test_dataset", {"batch_size": -1}, ValueError, r"test_dataset: batch_size=-1"),
    ],
)
def test_classification_task_method_argument_refused(method, kwargs, exc, regex):
    task = ClassificationTask(
        np.zeros((6, 2)), np.arange(6) % 3, np.zeros((2, 2)), [0, 1], name="toy"
    )
    with pytest.raises(exc, match=regex):
        getattr(task, method)(**kwargs)


# --------------------------------------------------------------------------------------------
# WarpGrad and LeapCallback

WARPGRAD_ROWS = [
    ("inner_optimizer", "nope", ValueError, r"WarpGrad: inner_optimizer='nope'.*optimizer name"),
    ("inner_optimizer", 3, TypeError, r"inner_optimizer=3"),
    ("meta_optimizer", "nope", ValueError, r"meta_optimizer='nope'"),
    (
        "meta_optimizer",
        keras.optimizers.Adam,
        TypeError,
        r"meta_optimizer=.*meta_optimizer=Adam\(\)",
    ),
    ("meta_interval", "5", TypeError, r"meta_interval='5'.*meta_interval=5"),
    ("meta_interval", 0, ValueError, r"meta_interval=0.*>= 1"),
    ("meta_interval", 1.5, TypeError, r"meta_interval=1\.5"),
    ("learning_rate", "fast", TypeError, r"learning_rate='fast'"),
    ("learning_rate", -0.1, ValueError, r"learning_rate=-0\.1.*> 0"),
    ("learning_rate", math.nan, ValueError, r"learning_rate=nan"),
    ("model", "m", TypeError, r"model='m'.*keras\.Model"),
    ("untagged", "ignore", ValueError, r"untagged='ignore'"),
    ("variable_roles", "task", TypeError, r"variable_roles='task'.*list"),
    ("variable_roles", ["bogus"], ValueError, r"variable_roles contains unknown roles"),
    ("variable_paths", 3, TypeError, r"variable_paths=3"),
    ("name", 3, TypeError, r"name=3.*non-empty string"),
    ("clipnorm", 1.0, ValueError, r"does not take `clipnorm`"),
    ("momentum", 0.9, ValueError, r"unexpected argument.*momentum"),
]


@pytest.mark.parametrize(
    "arg,value,exc,regex",
    WARPGRAD_ROWS,
    ids=[f"{a}-{i}" for i, (a, *_) in enumerate(WARPGRAD_ROWS)],
)
def test_warpgrad_argument_refused(arg, value, exc, regex):
    with pytest.raises(exc, match=regex) as excinfo:
        warpkeras.WarpGrad(**{arg: value})
    _message_check(excinfo, regex)


LEAP_CALLBACK_ROWS = [
    ("meta_optimizer", "nope", ValueError, r"LeapCallback: meta_optimizer='nope'"),
    ("meta_optimizer", 3, TypeError, r"meta_optimizer=3"),
    ("norm", "l1", ValueError, r"norm='l1'.*'energy', 'length'"),
    ("sign_correction", "yes", TypeError, r"sign_correction='yes'.*True or False"),
    ("loss_in_path", 0, TypeError, r"loss_in_path=0"),
    ("tasks_per_update", "2", TypeError, r"tasks_per_update='2'.*tasks_per_update=2"),
    ("tasks_per_update", 0, ValueError, r"tasks_per_update=0.*>= 1"),
    ("update_on_train_end", "no", TypeError, r"update_on_train_end='no'"),
    ("reset_inner_state", None, TypeError, r"reset_inner_state=None"),
    ("untagged", "ignore", ValueError, r"untagged='ignore'.*None, 'task'"),
]


@pytest.mark.parametrize(
    "arg,value,exc,regex",
    LEAP_CALLBACK_ROWS,
    ids=[f"{a}-{i}" for i, (a, *_) in enumerate(LEAP_CALLBACK_ROWS)],
)
def test_leap_callback_argument_refused(arg, value, exc, regex):
    with pytest.raises(exc, match=regex) as excinfo:
        warpkeras.LeapCallback(**{arg: value})
    _message_check(excinfo, regex)


def test_every_constructor_argument_has_a_row():
    """The tables cover each constructor's whole signature."""
    import inspect

    def params(fn):
        return {
            n
            for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }

    covered = {row[0] for row in COMMON} | {"model", "loss"}
    covered |= {row[0] for row in OWN["MetaTrainer"]}
    assert params(MetaTrainer.__init__) <= covered, params(MetaTrainer.__init__) - covered
    for name, rows in OWN.items():
        own = params(_trainer_class(name).__init__) - {"model", "loss"}
        assert own <= {r[0] for r in rows} | covered, (name, own)
    assert params(warpkeras.Task.__init__) <= {r[0] for r in TASK_ROWS}
    assert params(ClassificationTask.__init__) <= {r[0] for r in CT_ROWS}
    assert params(warpkeras.WarpGrad.__init__) <= {r[0] for r in WARPGRAD_ROWS}
    assert params(warpkeras.LeapCallback.__init__) <= {r[0] for r in LEAP_CALLBACK_ROWS}


# --------------------------------------------------------------------------------------------
# labels outside the head's range during training


def _tasks():
    x = np.random.default_rng(0).normal(size=(12, 4)).astype("float32")
    good = warpkeras.Task(train=(x, np.arange(12) % 3), batch_size=4, name="three-way")
    bad = warpkeras.Task(
        train=(x, np.arange(12) % 3), meta=(x, np.full(12, 4)), batch_size=4, name="five-way"
    )
    return good, bad


def test_label_outside_head_range_during_training(model):
    good, bad = _tasks()
    trainer = warpkeras.WarpTrainer(
        model, LOSS, mode="online", init_objective=None, inner_steps=1, meta_batch_size=1
    )
    with pytest.raises(
        ValueError,
        match=r"Task 'five-way': its meta labels must be class ids "
        r"in \[0, 3\).*0\.\.2",
    ) as excinfo:
        trainer.fit([bad], meta_steps=1, verbose=0)
    assert len(str(excinfo.value)) < 600
    plain = warpkeras.ReptileTrainer(model, LOSS, inner_steps=1, meta_batch_size=1)
    bad_train = warpkeras.Task(train=(good.train[0], np.arange(12) - 1), name="minus-one")
    with pytest.raises(ValueError, match=r"Task 'minus-one': its train labels.*\[-1, 10\]"):
        plain.fit([bad_train], meta_steps=1, verbose=0)
    held_out = warpkeras.Task(
        train=good.train, test=(good.train[0], np.full(12, 7)), name="test-seven"
    )
    with pytest.raises(ValueError, match=r"Task 'test-seven': its test labels.*\[7, 7\]"):
        plain.evaluate([held_out], steps=1, verbose=0)


def test_labels_not_checked_without_sparse_loss(model):
    """Other losses take no class ids: labels of any value pass the check."""
    trainer = warpkeras.ReptileTrainer(model, "mse", inner_steps=1, meta_batch_size=1)
    x = np.zeros((4, 4), "float32")
    task = warpkeras.Task(train=(x, np.full((4, 3), 9.0, "float32")), name="regression")
    trainer.fit([task], meta_steps=1, verbose=0)
    assert int(trainer.step.numpy()) == 1


def test_validation_helpers_message_format():
    with pytest.raises(TypeError) as excinfo:
        v.check_int("five", "inner_steps", minimum=1, where="WarpTrainer", example=5)
    assert str(excinfo.value) == (
        "WarpTrainer: inner_steps='five' is not valid: expected an "
        "integer >= 1 (e.g. inner_steps=5)."
    )
    assert v.check_int(5.0, "k") == 5 and v.check_float(np.float64(2), "a") == 2.0
    assert v.check_choice(None, "m", (None, "a")) is None
    with pytest.raises(ValueError, match="expected one of 0, 1"):
        v.check_choice(True, "flag", (0, 1))


@pytest.mark.parametrize(
    "kwargs,exc,regex",
    [
        ({"tasks": 5}, TypeError, r"TaskSampler: tasks=5.*list of warpkeras\.Task"),
        ({"tasks": []}, ValueError, r"at least one task"),
        ({"tasks": [object()]}, TypeError, r"Expected a warpkeras\.Task"),
        ({"tasks": "abc"}, TypeError, r"tasks='abc'"),
        ({"tasks": [None], "replace": "no"}, TypeError, r"replace='no'.*True or False"),
    ],
)
def test_task_sampler_argument_refused(kwargs, exc, regex):
    with pytest.raises(exc, match=regex):
        warpkeras.TaskSampler(**kwargs)


def test_task_sampler_accepts_one_task():
    task = warpkeras.Task(train=(X, Y), name="only")
    assert warpkeras.TaskSampler(task).sample(np.random.default_rng(0), 2) == [task, task]
