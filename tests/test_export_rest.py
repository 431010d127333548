"""The TF Serving requests of saved_models/README.md are real: their JSON bodies, converted
to tensors by the rules of TF Serving's REST API, are accepted by the signatures of the
SavedModel that the README exports, and answer as a direct call does.

TF Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest) takes a request
body ``{"signature_name": ..., "instances": [...]}`` (row format: one entry per example,
an object of named inputs or, for a single input, its value; every input shares the
leading dimension) or ``{"signature_name": ..., "inputs": ...}`` (columnar format: an
object of named inputs, each a tensor of any shape, or the value of the only input).
Numbers become the dtype the signature declares for the input. `rest_tensors` below
follows those rules.
"""

import contextlib
import io
import json
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

README = pathlib.Path(__file__).resolve().parent.parent / "saved_models" / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _nested_shape(value, where):
    """The shape of a rectangular nested list (TF Serving refuses ragged ones)."""
    if not isinstance(value, list):
        return []
    if not value:
        return [0]
    shapes = [_nested_shape(v, where) for v in value]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{where}: the nested lists are not rectangular")
    return [len(value)] + shapes[0]


def _tensor(value, spec, where):
    dtype = spec.dtype
    array = np.array(value, dtype=object)
    _nested_shape(value, where)
    if dtype.is_integer:
        flat = array.reshape(-1)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in flat):
            raise ValueError(f"{where}: {dtype.name} input takes JSON integers")
    elif dtype.is_floating:
        if any(isinstance(v, (bool, str)) for v in array.reshape(-1)):
            raise ValueError(f"{where}: {dtype.name} input takes JSON numbers")
    return tf.constant(np.array(value, dtype=dtype.as_numpy_dtype), dtype)


def rest_tensors(body, signature):
    """The keyword tensors that TF Serving passes to `signature` for a REST ``:predict``
    request `body` (a JSON string), and the response key (``predictions`` for the row
    format, ``outputs`` for the columnar one)."""
    request = json.loads(body)
    specs = signature.structured_input_signature[1]
    if ("instances" in request) == ("inputs" in request):
        raise ValueError("a request holds exactly one of 'instances' and 'inputs'")
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise ValueError("'instances' must be a non-empty list")
        if len(specs) == 1 and not isinstance(instances[0], dict):
            (name,) = specs
            columns = {name: instances}
        else:
            columns = {name: [] for name in specs}
            for row in instances:
                if not isinstance(row, dict) or set(row) != set(specs):
                    raise ValueError(f"each instance must name the inputs {sorted(specs)}")
                for name in specs:
                    columns[name].append(row[name])
        return {n: _tensor(v, specs[n], n) for n, v in columns.items()}, "predictions"
    inputs = request["inputs"]
    if not isinstance(inputs, dict) or set(inputs) != set(specs):
        if len(specs) == 1 and not isinstance(inputs, dict):
            (name,) = specs
            inputs = {name: inputs}
        else:
            raise ValueError(f"'inputs' must name the inputs {sorted(specs)}")
    return {n: _tensor(v, specs[n], n) for n, v in inputs.items()}, "outputs"


def _bodies():
    """``[(url, body)]`` of the README's curl requests."""
    found = re.findall(r"curl -X POST (\S+) -d '(.*?)'", README.read_text())
    assert len(found) >= 2, found
    return found


def _block(words):
    blocks = [b for b in _FENCE.findall(README.read_text()) if all(w in b for w in words)]
    assert len(blocks) == 1, words
    return blocks[0]


@pytest.fixture(scope="module")
def sensors(tmp_path_factory):
    """The README's SavedModel, exported by the README's own block."""
    work = tmp_path_factory.mktemp("rest")
    with contextlib.chdir(work):
        exec(_block(["export_adaptive", "saved_models/sensors/1"]), {"__name__": "__main__"})
    return tf.saved_model.load(str(work / "saved_models" / "sensors" / "1"))


def test_curl_bodies_are_valid_json_built_from_a_real_input():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_block(["json.dumps(body)"]), {"__name__": "__main__"})
    url, body = _bodies()[0]
    assert url == "http://localhost:8501/v1/models/sensors:predict"
    assert json.loads(body) == json.loads(out.getvalue())
    for _, body in _bodies():
        json.loads(body)  # no placeholders


def test_columnar_request_answers_as_a_direct_call(sensors):
    _, body = _bodies()[0]
    request = json.loads(body)
    signature = sensors.signatures[request["signature_name"]]
    tensors, key = rest_tensors(body, signature)
    assert key == "outputs"
    assert {n: t.dtype for n, t in tensors.items()} == {
        "x": tf.float32,
        "y": tf.int64,
        "steps": tf.int32,
        "queries": tf.float32,
    }
    assert tensors["steps"].shape == ()
    answer = signature(**tensors)["predictions"].numpy()
    inputs = request["inputs"]
    direct = sensors.adapt_and_predict(
        x=np.array(inputs["x"], "float32"),
        y=np.array(inputs["y"]),
        steps=np.int32(inputs["steps"]),
        queries=np.array(inputs["queries"], "float32"),
    )
    np.testing.assert_array_equal(answer, direct["predictions"].numpy())
    assert answer.shape == (2, 3)
    # The response is JSON as TF Serving writes it.
    assert len(json.loads(json.dumps({key: answer.tolist()}))[key]) == 2
    # Adaptation changed the answer (the request does something).
    at_init = sensors.signatures["serving_default"](x=tensors["queries"])["predictions"]
    assert np.abs(answer - at_init.numpy()).max() > 1e-3


def test_row_request_answers_as_a_direct_call(sensors):
    _, body = _bodies()[1]
    signature = sensors.signatures["serving_default"]  # no signature_name: the default
    assert "signature_name" not in json.loads(body)
    tensors, key = rest_tensors(body, signature)
    assert key == "predictions" and tensors["x"].shape == (2, 3)
    answer = signature(**tensors)["predictions"].numpy()
    direct = sensors.predict(np.array(json.loads(body)["instances"], "float32"))
    np.testing.assert_array_equal(answer, direct["predictions"].numpy())
    # The same request in the columnar format gives the same answer.
    columnar = json.dumps({"inputs": json.loads(body)["instances"]})
    tensors, key = rest_tensors(columnar, signature)
    assert key == "outputs"
    np.testing.assert_array_equal(signature(**tensors)["predictions"].numpy(), answer)


def test_conversion_refuses_what_tf_serving_refuses(sensors):
    adapt = sensors.signatures["adapt_and_predict"]
    _, body = _bodies()[0]
    request = json.loads(body)
    # The row format cannot carry arguments of different lengths (steps is a scalar).
    rows = [
        {"x": x, "y": y, "steps": 5, "queries": request["inputs"]["queries"][0]}
        for x, y in zip(request["inputs"]["x"], request["inputs"]["y"])
    ]
    tensors, _ = rest_tensors(json.dumps({"instances": rows}), adapt)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError, TypeError)):
        adapt(**tensors)
    bad = dict(request["inputs"], y=[0.5] * 6)
    with pytest.raises(ValueError, match="int64 input takes JSON integers"):
        rest_tensors(json.dumps({"inputs": bad}), adapt)
    with pytest.raises(ValueError, match="must name the inputs"):
        rest_tensors(json.dumps({"inputs": dict(request["inputs"], extra=1)}), adapt)
    with pytest.raises(ValueError, match="rectangular"):
        rest_tensors(json.dumps({"inputs": dict(request["inputs"], x=[[0.1], [0.2, 0.3]])}), adapt)
