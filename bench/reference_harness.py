"""Times the authors' PyTorch WarpGrad/Leap Omniglot code on this machine (meta steps).

Runs under a separate Python environment that has PyTorch (not warpkeras' environment), on
a checkout of the authors' repository that lives outside this repository::

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 numpy pillow joblib
    git clone <the authors' warpgrad repository> /work/ref/warpgrad
    /work/refvenv/bin/python bench/reference_harness.py --repo /work/ref/warpgrad

Nothing of the authors' code is copied here: the script puts their ``src/omniglot``,
``src/leap``, ``src/warpgrad`` and ``src/maml`` folders on ``sys.path`` and builds, with
their own ``model.get_model``, the network, the meta-learner wrapper (``LeapWrapper`` or
``WarpGradWrapper``) and the optimisers exactly as their ``main.py`` does with its
defaults, except for the sizes set below. One meta step is their ``wrapper(tasks,
meta_train=True)``: for each task of the meta-batch, K inner SGD steps (Leap: plus
``Leap.update`` each step; Warp-Leap: plus the replay-buffer copy of the adapted
parameters at each forward pass), then the held-out evaluation of that task; then the meta
update (Leap: the θ0 step; Warp-Leap: ``DualUpdater.backward``, i.e. one warp update per
stored point (``warp_on_same_loss``, bsz 1, one epoch) and the ``simplified_leap`` θ0 step).

Work per meta step, matched to ``bench/meta_step.py``: meta-batch 5, K = 100, task batch
20, inner SGD lr 0.1, outer SGD lr 0.1, 20 classes, 4 conv blocks of 64 filters with batch
norm, warp layers = one 3x3 Conv2d(64, 64) after each block (``main.py``'s defaults: no
batch norm, activation or residual in the warp layer; head not warped), 500 warp updates,
synthetic random 28x28 images (15 training and 5 held-out per class, as Omniglot) drawn
through their ``data.RandomSampler`` and a ``DataLoader`` as their ``DataContainer``
builds it (no augmentation, as on warpkeras' side). torchvision (imported by their
``data.py`` only for the image folder dataset and transforms, both unused here) is
replaced by a stub when it is not installed.

Their meta step also evaluates every task on its held-out images, which warpkeras' ``fit``
does not do: that time is measured (``heldout_eval_s_per_meta_step``) and
``meta_step_s_net`` gives the meta step without it. Other parts are timed by wrapping their
functions (not changing them): task adaptation, the meta update, the warp objective and the
Leap θ0 step of Warp-Leap; ``warp_updates_per_meta_step`` counts the calls of their
``updaters.step`` / ``approx_step``.

Prints one JSON object (the keys ``bench/meta_step.py --reference-json`` reads:
``leap.meta_step_s_mean``, ``warp_leap.meta_step_s_mean``,
``*.heldout_eval_s_per_meta_step``, ``*.inner_step_ms``, ``warp_leap.warp_update_ms``)
and writes it to ``--out`` when given.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
import types
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--repo",
        required=True,
        help="checkout of the authors' warpgrad repository (has src/omniglot)",
    )
    p.add_argument(
        "--methods", nargs="+", choices=("leap", "warp_leap"), default=["leap", "warp_leap"]
    )
    p.add_argument("--meta-batch", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=100, help="K")
    p.add_argument("--task-batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="timed meta steps per method")
    p.add_argument(
        "--warmup-inner-steps",
        type=int,
        default=5,
        help="K of the untimed warm-up meta step (default 5)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch intra- and inter-op threads (default 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    # their warp objective draws two batches per stored point from the task's K batches
    for name in ("inner_steps", "warmup_inner_steps"):
        if getattr(args, name) < 2:
            p.error(
                f"--{name.replace('_', '-')} must be >= 2 (their warp update draws two "
                f"batches from the task's K; got {getattr(args, name)})"
            )
    return args


def stub_torchvision():
    """Installs a minimal ``torchvision`` if there is none: the authors' ``data.py``
    imports its Omniglot folder dataset, ``list_dir``/``list_files`` and ``transforms``
    at module level; this harness uses none of them (its tasks are synthetic)."""
    try:
        import torchvision  # noqa: F401

        return False
    except ImportError:
        pass
    import torch.utils.data

    def unused(*args, **kwargs):
        raise RuntimeError("torchvision stub: not available in the reference harness")

    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    omniglot = types.ModuleType("torchvision.datasets.omniglot")
    omniglot.Omniglot = type("Omniglot", (torch.utils.data.Dataset,), {})
    utils = types.ModuleType("torchvision.datasets.utils")
    utils.list_dir = utils.list_files = unused
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = lambda fns: unused
    transforms.RandomAffine = lambda *a, **k: None
    transforms.ToTensor = lambda *a, **k: None
    tv.datasets, tv.transforms = datasets, transforms
    datasets.omniglot, datasets.utils = omniglot, utils
    for name, mod in {
        "torchvision": tv,
        "torchvision.datasets": datasets,
        "torchvision.datasets.omniglot": omniglot,
        "torchvision.datasets.utils": utils,
        "torchvision.transforms": transforms,
    }.items():
        sys.modules[name] = mod
    return True


def import_reference(repo):
    src = os.path.join(os.path.abspath(repo), "src")
    if not os.path.isfile(os.path.join(src, "omniglot", "wrapper.py")):
        raise SystemExit(
            f"--repo {repo!r}: no src/omniglot/wrapper.py there; pass a "
            "checkout of the authors' warpgrad repository"
        )
    for sub in ("omniglot", "leap", "warpgrad", "maml"):
        path = os.path.join(src, sub)
        if path not in sys.path:
            sys.path.insert(0, path)
    stubbed = stub_torchvision()
    import data as ref_data
    import model as ref_model
    import warpgrad.updaters as ref_updaters

    return ref_data, ref_model, ref_updaters, stubbed


def synthetic_task_class():
    import torch

    class SyntheticTask(torch.utils.data.Dataset):
        """Random 28x28 images, 20 classes, 15 training + 5 held-out per class; the
        ``train()``/``eval()``/``_train`` interface of the authors' ``SubOmniglot``."""

        def __init__(self, gen, classes, train_per_class, heldout_per_class):
            def part(k):
                x = torch.rand((classes * k, 1, 28, 28), generator=gen)
                y = torch.arange(classes).repeat_interleave(k)
                return x, y

            self._parts = {True: part(train_per_class), False: part(heldout_per_class)}
            self._train = True

        def train(self):
            self._train = True

        def eval(self):
            self._train = False

        def __len__(self):
            return len(self._parts[self._train][1])

        def __getitem__(self, i):
            x, y = self._parts[self._train]
            return x[i], y[i]

    return SyntheticTask


def main_args(meta_model, classes):
    """The namespace ``model.get_model`` reads, with ``main.py``'s defaults."""
    return types.SimpleNamespace(
        classes=classes,
        num_layers=4,
        kernel_size=3,
        num_filters=64,
        imsize=(28, 28),
        padding=1,
        batch_norm=True,
        multi_head=False,
        meta_model=meta_model,
        warp_num_layers=1,
        warp_num_filters=64,
        warp_residual=False,
        warp_act_fun="None",
        warp_batch_norm=False,
        warp_final_head=False,
        cuda=False,
        log_ival=0,
        inner_opt="sgd",
        outer_opt="sgd",
        inner_kwargs={"lr": 0.1},
        outer_kwargs={"lr": 0.1},
        meta_kwargs={},
    )


class Clock:
    """Accumulates the wall time and calls of wrapped functions."""

    def __init__(self):
        self.s, self.n = {}, {}

    def wrap(self, name, fn, when=None):
        def timed(*args, **kwargs):
            if when is not None and not when(*args, **kwargs):
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
                self.n[name] = self.n.get(name, 0) + 1

        return timed

    def count(self, name, fn):
        def counted(*args, **kwargs):
            self.n[name] = self.n.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def reset(self):
        self.s, self.n = {}, {}


def run_method(method, args, ref, pool):
    import torch

    ref_data, ref_model, ref_updaters, _ = ref
    torch.manual_seed(args.seed)
    wrapper = ref_model.get_model(main_args(method, 20), torch.nn.CrossEntropyLoss())
    # torch >= 2 zeroes gradients by setting them to None; the authors' code was written
    # for torch 1.x, where zero_grad() zeroed them in place, and Leap.update adds into
    # them (it fails on None): restore the old behaviour for their meta optimiser
    wrapper.meta_optimizer.zero_grad = functools.partial(
        wrapper.meta_optimizer.zero_grad, set_to_none=False
    )
    clock = Clock()
    # timers around the authors' functions; their code is not changed
    wrapper.run_task = clock.wrap(
        "adapt", wrapper.run_task, when=lambda task, train, meta_train: train
    )
    wrapper.run_task = clock.wrap(
        "heldout", wrapper.run_task, when=lambda task, train, meta_train: not train
    )
    wrapper._final_meta_update = clock.wrap("meta_update", wrapper._final_meta_update)
    if method == "warp_leap":
        ref_updaters.WARP_OBJECTIVES[1] = clock.wrap(
            "warp_objective", ref_updaters.WARP_OBJECTIVES[1]
        )
        ref_updaters.INIT_OBJECTIVES[1] = clock.wrap("leap_init", ref_updaters.INIT_OBJECTIVES[1])
        ref_updaters.step = clock.count("warp_updates", ref_updaters.step)
        ref_updaters.approx_step = clock.count("warp_updates", ref_updaters.approx_step)
        buffer_update = wrapper.model.buffer.update
        wrapper.model.buffer.update = clock.count("stored_points", buffer_update)
    # their DataContainer.get_loader with main.py's loader settings
    container = types.SimpleNamespace(kwargs={"num_workers": 0, "pin_memory": False})
    gen = torch.Generator().manual_seed(args.seed + 1)

    def tasks(k):
        idx = torch.randperm(len(pool), generator=gen)[: args.meta_batch].tolist()
        return [
            ref_data.DataContainer.get_loader(container, pool[i], args.task_batch, k) for i in idx
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper(tasks(args.warmup_inner_steps), meta_train=True)  # warm-up, untimed
        samples, parts = [], []
        for _ in range(args.repeats):
            batch = tasks(args.inner_steps)
            clock.reset()
            t = time.perf_counter()
            res = wrapper(batch, meta_train=True)
            samples.append(time.perf_counter() - t)
            parts.append((dict(clock.s), dict(clock.n)))
    n = len(samples)

    def mean_s(key):
        return sum(p[0].get(key, 0.0) for p in parts) / n

    def mean_n(key):
        return sum(p[1].get(key, 0) for p in parts) / n

    heldout = mean_s("heldout")
    inner_steps = args.meta_batch * args.inner_steps
    out = {
        "meta_step_s_mean": sum(samples) / n,
        "meta_step_s_all": samples,
        "meta_step_s_net": [s - p[0].get("heldout", 0.0) for s, p in zip(samples, parts)],
        "task_adaptation_s_per_meta_step": mean_s("adapt"),
        "inner_step_ms": mean_s("adapt") / inner_steps * 1e3,
        "heldout_eval_s_per_meta_step": heldout,
        "meta_update_s_per_meta_step": mean_s("meta_update"),
        "train_loss_last": float(getattr(res, "train_loss", float("nan"))),
    }
    if method == "leap":
        out["inner_step_note"] = (
            "includes leap.Leap.update per step (state_dict+grad clone, path increment)"
        )
    else:
        updates = mean_n("warp_updates")
        out.update(
            {
                "stored_points_per_meta_step": mean_n("stored_points"),
                "warp_updates_per_meta_step": updates,
                "warp_updates_s_per_meta_step": mean_s("warp_objective"),
                "warp_update_ms": mean_s("warp_objective") / updates * 1e3 if updates else None,
                "leap_init_step_s_per_meta_step": mean_s("leap_init"),
                "inner_step_note": "includes Warp.__call__ replay-buffer dump (clone of adapt "
                "state) per step",
            }
        )
    out["other_s_per_meta_step"] = (
        out["meta_step_s_mean"]
        - out["task_adaptation_s_per_meta_step"]
        - heldout
        - out["meta_update_s_per_meta_step"]
    )
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    # before any parallel work, as the intra-/inter-op pools are fixed at first use
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    ref = import_reference(args.repo)
    SyntheticTask = synthetic_task_class()
    gen = torch.Generator().manual_seed(args.seed)
    pool = [SyntheticTask(gen, 20, 15, 5) for _ in range(20)]
    try:
        import joblib

        joblib_cpus = joblib.cpu_count()
    except ImportError:
        joblib_cpus = None
    result = {
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "joblib_cpu_count": joblib_cpus,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkl_available": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "reference_repo": os.path.abspath(args.repo),
        "torchvision_stubbed": ref[3],
        "config": {
            "classes": 20,
            "image": [1, 28, 28],
            "train_per_class": 15,
            "heldout_per_class": 5,
            "task_batch": args.task_batch,
            "inner_steps": args.inner_steps,
            "meta_batch": args.meta_batch,
            "inner_opt": "sgd",
            "inner_lr": 0.1,
            "outer_opt": "sgd",
            "outer_lr": 0.1,
            "conv_blocks": 4,
            "filters": 64,
            "batch_norm": True,
            "warp_layers": "1 x Conv2d(64,64,3,pad=1) after each of the 4 conv blocks "
            "(no BN/act/residual; main.py defaults); head not warped",
            "warp_objective": "DualUpdater defaults: warp_on_same_loss, epochs=1, bsz=1, "
            "approx=False; init: simplified_leap norm=True",
            "warmup_meta_steps": 1,
            "warmup_inner_steps": args.warmup_inner_steps,
            "repeats": args.repeats,
            "seed": args.seed,
        },
    }
    for method in args.methods:
        result[method] = run_method(method, args, ref, pool)
        print(
            f"# reference {method}: {result[method]['meta_step_s_mean']:.2f} s per meta step "
            f"(held-out eval {result[method]['heldout_eval_s_per_meta_step']:.2f} s)",
            file=sys.stderr,
            flush=True,
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _common

        _common.write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
