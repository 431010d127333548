"""The benchmarks' machine probe and op profiler helpers (bench/_common.py)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "_common.py"


@pytest.fixture(scope="module")
def bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2450.000
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse2 avx avx2 fma hypervisor

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 3100.500
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse2 avx avx2 fma hypervisor
"""


def test_cpu_info_reads_the_kernels_listing(bench_common):
    info = bench_common.cpu_info(CPUINFO)
    assert info["model"] == "AMD EPYC 7B13"
    assert info["family_model"] == "25/1"
    assert {"avx2", "fma"} <= info["flags"] and "avx512f" not in info["flags"]
    assert info["mhz"] == 3100.5  # the highest clock over the logical CPUs
    assert info["threads_per_core"] == 2
    assert info["hypervisor"] is True
    peak = bench_common.fma_peak(2, info["mhz"], info["flags"])
    assert peak["simd"] == "avx2" and peak["flops_per_cycle_per_core"] == 32


def test_cpu_info_without_the_file(bench_common):
    info = bench_common.cpu_info("")
    assert info["flags"] == set() and info["mhz"] is None and info["threads_per_core"] is None


def test_op_type_keeps_onednn_kernels(bench_common):
    op_type = bench_common._op_type
    assert op_type("model/conv1/convolution:_MklNativeConv2D") == "_MklNativeConv2D"
    assert op_type("model/dense/MatMul:_MklFusedMatMul") == "_MklFusedMatMul"
    assert op_type("model/conv1/convolution:Conv2D") == "Conv2D"
    assert op_type("tensorflow::EagerExecute:Thing") is None
    assert op_type("ExecutorState::Process") is None
    assert op_type("step:_") is None
    assert op_type("a:has space") is None


def test_write_text_replaces_the_file_whole(bench_common, tmp_path, monkeypatch):
    path = tmp_path / "results" / "run.json"
    bench_common.write_text(str(path), '{"a": 1}\n')
    real_replace = bench_common.os.replace

    def killed(*args):
        raise KeyboardInterrupt  # killed before the rename

    monkeypatch.setattr(bench_common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        bench_common.write_text(str(path), '{"a": 2}\n')
    monkeypatch.setattr(bench_common.os, "replace", real_replace)
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    bench_common.write_text(str(path), '{"a": 3}\n')
    assert path.read_text() == '{"a": 3}\n'
