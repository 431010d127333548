"""Installs warpkeras.

TensorFlow ships as two distributions that must not both be installed:

* ``pip install -e .[cpu]`` pulls ``tensorflow-cpu`` (small, no CUDA), then
  ``pip install --no-deps tf-keras~=2.21.0`` (needed by tensorflow-probability; its
  declared dependency on ``tensorflow`` would install the second distribution);
* ``pip install -e .[gpu]`` pulls ``tensorflow[and-cuda]`` and ``tf-keras`` for NVIDIA GPUs;
* ``pip install -e .`` installs neither and uses the TensorFlow already present.
"""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "warpkeras" / "__init__.py").read_text()
).group(1)

TF_VERSION = "~=2.21.0"

setup(
    name="warpkeras",
    version=VERSION,
    description=(
        "Meta-learned optimisers by gradient warping (WarpGrad) and meta-learned "
        "initialisations (Leap, MAML, Reptile) for TensorFlow / Keras 3."
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["warpkeras", "warpkeras.*"]),
    install_requires=[
        "keras>=3.3",
        "numpy>=1.24",
        "tensorflow-datasets>=4.9",
        "tensorflow-probability>=0.24",
        "gymnasium>=1.0",
        # tensorflow-datasets needs it to download; TensorFlow no longer pulls TensorBoard.
        "importlib_resources",
        "tensorboard",
        "matplotlib>=3.7",
    ],
    extras_require={
        # tensorflow-probability imports tf_keras when it is loaded. tf-keras declares a
        # dependency on the `tensorflow` distribution, which must not be installed beside
        # `tensorflow-cpu`: with [cpu], install it with `pip install --no-deps tf-keras`.
        "cpu": [f"tensorflow-cpu{TF_VERSION}"],
        "gpu": [f"tensorflow[and-cuda]{TF_VERSION}", f"tf-keras{TF_VERSION}"],
        "test": ["pytest>=7"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
