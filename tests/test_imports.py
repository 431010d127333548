"""``import warpkeras`` loads only what the core needs.

tensorflow-datasets, tensorflow-probability, gymnasium and matplotlib are optional extras
(``warpkeras[data]``, ``[rl]``, ``[plot]``): ``import warpkeras`` must neither need them nor
load them; the modules that use them load them when they are used.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parent.parent
OPTIONAL = ("tensorflow_datasets", "tensorflow_probability", "gymnasium", "matplotlib")


def _run(code):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_import_loads_no_optional_module():
    # Keras itself imports matplotlib when it is installed (keras.src.visualization), so
    # what counts is what `import warpkeras` adds to `import keras`.
    out = _run(f"""
        import sys
        import keras
        before = set(sys.modules)
        import warpkeras
        added = set(sys.modules) - before
        for name in {OPTIONAL!r}:
            loaded = sorted(m for m in added if m == name or m.startswith(name + "."))
            print(name, "loaded" if loaded else "not loaded", loaded[:3])
        """)
    for name in OPTIONAL:
        assert f"{name} not loaded" in out, out


def test_import_works_without_optional_packages():
    # The four packages made uninstallable: the core imports, and each optional part
    # answers with the extra to install.
    out = _run(f"""
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Missing())
        import warpkeras
        print("version", warpkeras.__version__)
        try:
            warpkeras.envs
        except ImportError as e:
            print("envs:", e)
        """)
    assert "version " in out, out
    assert 'envs: warpkeras.envs needs gymnasium: pip install "warpkeras[rl]"' in out, out


def test_envs_load_on_first_use():
    out = _run("""
        import sys, warpkeras
        print("before", "gymnasium" in sys.modules)
        print("env", warpkeras.envs.MAZE_ENV_ID)
        print("after", "gymnasium" in sys.modules)
        """)
    assert "before False" in out and "env warpkeras/Maze-v0" in out and "after True" in out, out
