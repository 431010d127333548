"""Argument checks shared by the constructors and entry points of warpkeras.

Every check returns the value converted to its canonical type (``int``, ``float``,
``bool``, ...) or raises an error whose message names where the value was given, the
argument, the value received and what to pass instead, e.g.::

    WarpTrainer: inner_steps='five' is not valid: expected an integer >= 1 (e.g. inner_steps=5).

Wrong *types* raise `TypeError`, values of the right type but outside the allowed range
raise `ValueError` (or the `error` class given, which should subclass `ValueError`, such
as `warpkeras.trainers.MetaTrainingError`). Booleans are never accepted as numbers, and
numbers never as booleans: ``inner_steps=True`` and ``jit_compile=1`` are refused.

Example:

```python
from warpkeras import _validation as v
steps = v.check_int(steps, "steps", minimum=1, where="adapt")
lr = v.check_float(lr, "inner_learning_rate", minimum=0.0, where="MetaTrainer")
opt = v.get_optimizer("adam", "meta_optimizer", where="MetaTrainer")
```
"""

import copy
import difflib
import math
import numbers
import os

import numpy as np

__all__ = [
    "describe",
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_seed",
    "check_callable",
    "check_directory",
    "check_same_length",
    "get_optimizer",
]


def describe(value, limit=60):
    """A short ``repr`` of `value` for messages (long values are cut)."""
    if isinstance(value, np.ndarray) and value.size > 8:
        return f"<array shape={value.shape} dtype={value.dtype}>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any repr failure: fall back to the type name
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prefix(where):
    return f"{where}: " if where else ""


def _fail(error, name, value, expected, where=None, hint=None):
    message = f"{_prefix(where)}{name}={describe(value)} is not valid: expected {expected}"
    if hint:
        message += f" ({hint})"
    raise error(message + ".")


def _range_text(minimum, maximum, min_inclusive=True, max_inclusive=True):
    parts = []
    if minimum is not None:
        parts.append(f"{'>=' if min_inclusive else '>'} {minimum}")
    if maximum is not None:
        parts.append(f"{'<=' if max_inclusive else '<'} {maximum}")
    return " and ".join(parts)


def _is_integer(value):
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def _is_real(value):
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def _scalar(value):
    """A 0-d numpy array or 0-d tensor as a Python/numpy scalar; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    if (
        hasattr(value, "numpy")
        and getattr(value, "shape", None) == ()
        and not isinstance(value, (numbers.Number, np.generic))
    ):
        try:
            return value.numpy()
        except Exception:  # noqa: BLE001 - symbolic tensors: leave as is
            return value
    return value


def check_int(
    value,
    name,
    *,
    minimum=None,
    maximum=None,
    allow_none=False,
    where=None,
    example=None,
    error=ValueError,
):
    """An integer argument (Python or numpy integer; integral floats such as ``5.0`` too).

    Args:
        value: the value given.
        name: the argument's name, used in the message.
        minimum, maximum: inclusive bounds, or `None`.
        allow_none: accept `None` (returned as `None`).
        where: what received the argument (e.g. ``"Task"``), prefixed to the message.
        example: a valid value shown in the message (default: `minimum` or 1).
        error: the exception class for out-of-range values (a `ValueError` subclass).

    Returns:
        The value as a Python `int` (or `None`).

    Raises:
        TypeError: not an integer (a string, a bool, a non-integral float, ...).
        `error`: outside ``[minimum, maximum]``.
    """
    if value is None and allow_none:
        return None
    value = _scalar(value)
    expected = "an integer" + (
        f" {_range_text(minimum, maximum)}" if minimum is not None or maximum is not None else ""
    )
    if allow_none:
        expected += " or None"
    if example is None:
        example = minimum if minimum is not None else 1
    hint = f"e.g. {name}={example}"
    if not _is_integer(value):
        if (
            isinstance(value, (float, np.floating))
            and math.isfinite(value)
            and float(value).is_integer()
        ):
            value = int(value)
        else:
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                hint = f"pass the number, not a string: {name}={int(value)}"
            _fail(TypeError, name, value, expected, where, hint)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(error, name, value, expected, where, hint)
    return value


def check_float(
    value,
    name,
    *,
    minimum=None,
    maximum=None,
    min_inclusive=True,
    max_inclusive=True,
    allow_none=False,
    where=None,
    example=None,
    error=ValueError,
):
    """A finite real argument (Python / numpy number, 0-d array or tensor).

    NaN and infinities are always refused.

    Args:
        value: the value given.
        name: the argument's name.
        minimum, maximum: bounds, or `None`.
        min_inclusive, max_inclusive: whether the bounds themselves are allowed.
        allow_none: accept `None` (returned as `None`).
        where: what received the argument, prefixed to the message.
        example: a valid value shown in the message.
        error: the exception class for out-of-range values.

    Returns:
        The value as a Python `float` (or `None`).

    Raises:
        TypeError: not a real number (a string, a bool, a list, ...).
        `error`: NaN, infinite or outside the bounds.
    """
    if value is None and allow_none:
        return None
    value = _scalar(value)
    bounds = _range_text(minimum, maximum, min_inclusive, max_inclusive)
    expected = "a finite number" + (f" {bounds}" if bounds else "")
    if allow_none:
        expected += " or None"
    hint = f"e.g. {name}={example}" if example is not None else None
    if not _is_real(value):
        if isinstance(value, str):
            try:
                float(value)
                hint = f"pass the number, not a string: {name}={float(value)!r}"
            except ValueError:
                pass
        _fail(TypeError, name, value, expected, where, hint)
    value = float(value)
    if not math.isfinite(value):
        _fail(error, name, value, expected, where, hint)
    if minimum is not None and (value < minimum or (value == minimum and not min_inclusive)):
        _fail(error, name, value, expected, where, hint)
    if maximum is not None and (value > maximum or (value == maximum and not max_inclusive)):
        _fail(error, name, value, expected, where, hint)
    return value


def check_bool(value, name, *, allow_none=False, where=None):
    """A boolean argument: `True` / `False` (or a numpy bool); nothing else.

    Returns:
        The value as a Python `bool` (or `None` when `allow_none`).

    Raises:
        TypeError: any other value (``"False"``, ``0``, ``1``, ...).
    """
    if value is None and allow_none:
        return None
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    expected = "True or False" + (" or None" if allow_none else "")
    _fail(TypeError, name, value, expected, where, f"e.g. {name}=True")


def check_choice(value, name, choices, *, where=None, error=ValueError):
    """One of a fixed set of values (`None` only if it is among `choices`).

    Strings are compared exactly; a near miss gets a "did you mean" in the message.

    Returns:
        The value.

    Raises:
        `error`: not one of `choices` (unhashable values too).
    """
    try:
        ok = any(value is c or (type(value) is type(c) and value == c) for c in choices)
    except (TypeError, ValueError):  # incomparable (e.g. arrays)
        ok = False
    if ok:
        return value
    listed = ", ".join(repr(c) for c in choices)
    hint = None
    if isinstance(value, str):
        strings = [c for c in choices if isinstance(c, str)]
        close = difflib.get_close_matches(value.lower(), strings, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {name}={close[0]!r}?"
    _fail(error, name, value, f"one of {listed}", where, hint)


def check_seed(value, name="seed", *, allow_none=False, where=None, error=ValueError):
    """A random seed: an integer >= 0 (what `numpy.random.default_rng` takes).

    Returns:
        The seed as a Python `int` (or `None`).

    Raises:
        TypeError: not an integer (``seed="abc"``, ``seed=1.5``).
        `error`: negative or too large.
    """
    return check_int(
        value, name, minimum=0, allow_none=allow_none, where=where, example=0, error=error
    )


def check_callable(value, name, *, allow_none=True, where=None, signature=None):
    """A callable argument (a function, a Keras object, ...).

    Args:
        signature: how it is called, e.g. ``"augment(x, rng) -> x"``, shown in the message.

    Returns:
        The value.

    Raises:
        TypeError: not callable.
    """
    if (value is None and allow_none) or callable(value):
        return value
    expected = "a callable" + (f" {signature}" if signature else "")
    if allow_none:
        expected += " or None"
    _fail(TypeError, name, value, expected, where)


def check_directory(path, name, *, allow_none=True, where=None, error=ValueError):
    """A folder that exists or can be created: refuses paths naming a file (or lying
    under one) and folders that are not writable.

    Nothing is created here.

    Returns:
        The path as a `str` (or `None`).

    Raises:
        TypeError: not a path (`str` / `os.PathLike`).
        `error`: a file is in the way, or the folder is not writable.
    """
    if path is None and allow_none:
        return None
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        _fail(
            TypeError,
            name,
            path,
            "a folder path (str or os.PathLike)" + (" or None" if allow_none else ""),
            where,
        )
    path = os.fspath(path)
    if not path:
        _fail(error, name, path, "a non-empty folder path", where)
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(
            error,
            name,
            path,
            "a folder, but a file of that name exists",
            where,
            "choose another folder or remove the file",
        )
    # The nearest existing ancestor must be a writable folder (not a file).
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if os.path.exists(parent) and not os.path.isdir(parent):
        _fail(
            error,
            name,
            path,
            f"a folder path, but its parent {parent!r} is a file",
            where,
            "choose another folder",
        )
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        _fail(
            error,
            name,
            path,
            f"a writable folder, but {parent!r} is not writable",
            where,
            "choose a folder you can write to",
        )
    return path


def check_same_length(x, y, name, *, where=None, error=ValueError):
    """``len(x) == len(y)`` for a pair of arrays given as argument `name`.

    Raises:
        `error`: the lengths differ (message gives both).
    """
    if len(x) != len(y):
        raise error(
            f"{_prefix(where)}{name}: x and y differ in length ({len(x)} vs {len(y)} rows); "
            "give one label per example."
        )


def get_optimizer(identifier, name, *, allow_none=True, where=None):
    """A Keras optimizer from any identifier `keras.optimizers.get` accepts.

    Args:
        identifier: a `keras.optimizers.Optimizer`, a name (``"adam"``, ``"SGD"``), or a
            serialised config (``keras.optimizers.serialize(opt)`` /
            ``{"class_name": "Adam", "config": {...}}``), or `None` when `allow_none`.
        name: the argument's name.

    Returns:
        A `keras.optimizers.Optimizer` (a new one for names and configs, the same object
        for an instance), or `None`.

    Raises:
        TypeError: anything else (a class, a number, ...).
        ValueError: an unknown optimizer name or a config that cannot be read.
    """
    import keras

    if identifier is None and allow_none:
        return None
    if isinstance(identifier, keras.optimizers.Optimizer):
        return identifier
    expected = (
        "a keras.optimizers.Optimizer, an optimizer name such as 'adam' or 'sgd', "
        "or a serialised optimizer config"
    ) + (" or None" if allow_none else "")
    if isinstance(identifier, type) and issubclass(identifier, keras.optimizers.Optimizer):
        _fail(
            TypeError,
            name,
            identifier,
            expected,
            where,
            f"pass an instance: {name}={identifier.__name__}()",
        )
    if not isinstance(identifier, (str, dict)):
        _fail(TypeError, name, identifier, expected, where)
    if isinstance(identifier, dict):
        identifier = copy.deepcopy(identifier)  # Keras' deserialisation edits the dict
    try:
        optimizer = keras.optimizers.get(identifier)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"{_prefix(where)}{name}={describe(identifier)} is not valid: expected {expected} "
            f"(Keras could not read it: {e})."
        ) from None
    if not isinstance(optimizer, keras.optimizers.Optimizer):  # pragma: no cover - Keras checks
        _fail(ValueError, name, identifier, expected, where)
    return optimizer
