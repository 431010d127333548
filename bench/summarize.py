"""Prints the key figures of the last benchmark results as Markdown.

Reads ``bench/results/*.json`` (written by the benchmark scripts) and prints, for each,
the machine and load it was measured under, the headline ratios and the targets with
met / missed — the material of ``bench/README.md``'s "Last figures" section.

Usage::

    python bench/summarize.py                 # all results
    python bench/summarize.py --results DIR   # another results folder
"""

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def machine_line(m, end_load=None):
    load = m.get("load_at_start", {})
    text = (
        f"{m.get('cpu_model')} (family/model {m.get('cpu_family_model')}), "
        f"{m.get('cores')} cores @ {m.get('cpu_mhz')} MHz, "
        f"{'AVX-512' if m.get('avx512f') else 'AVX2' if m.get('avx2') else 'no AVX2'}; "
        f"TF {m.get('tensorflow')}, Keras {m.get('keras')}; {m.get('date')}; "
        f"load {load.get('loadavg_1m')}"
    )
    if end_load:
        text += f" → {end_load.get('loadavg_1m')}"
    return text


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def targets_table(targets):
    lines = ["| target | value | met |", "|---|---|---|"]
    for name, t in targets.items():
        value = t.get("value", t.get("value_s"))
        lines.append(f"| {name} | {fmt(value)} | {'yes' if t.get('met') else 'no'} |")
    return "\n".join(lines)


def reference_section(name, d):
    """The authors' code timed on this machine (written by an external harness)."""
    out = [
        f"### {name}",
        "",
        f"torch {d.get('torch_version')}, {d.get('torch_num_threads')} threads, "
        f"{d.get('cpu_capability')}",
        "",
    ]
    for method in ("leap", "warp_leap"):
        r = d.get(method) or {}
        keys = (
            "meta_step_s_mean",
            "inner_step_ms",
            "warp_update_ms",
            "heldout_eval_s_per_meta_step",
        )
        out.append(f"{method}: " + ", ".join(f"{k} {fmt(r[k])}" for k in keys if k in r))
    return "\n".join(out) + "\n"


def section(name, d):
    if "benchmark" not in d:
        return reference_section(name, d)
    out = [
        f"### {name}",
        "",
        "Machine: " + machine_line(d.get("machine", {}), d.get("load_at_end")),
        "",
    ]
    if name.startswith("inner_step"):
        out.append("ms per step: " + ", ".join(f"{k} {v}" for k, v in d["ms_per_step"].items()))
        out.append("")
        out.append(
            "ratios (medians): " + ", ".join(f"{k} {fmt(v)}" for k, v in d["ratios"].items())
        )
        if d.get("ratios_from_fastest_samples"):
            out.append("")
            out.append(
                "ratios (fastest samples): "
                + ", ".join(f"{k} {fmt(v)}" for k, v in d["ratios_from_fastest_samples"].items())
            )
        fr = d["flop_rates"]["trainer_function"]
        out.append("")
        out.append(
            f"FLOP rate of the trainer step: {fr['gflops']} GFLOP/s = "
            f"{fr['of_matmul_rate']} of the 2048² matmul "
            f"({d['flop_rates']['matmul_2048']['gflops']} GFLOP/s), "
            f"{fr['of_brief_peak_532']} of 532 GFLOP/s, {fr['of_peak_from_flags']} of the "
            "peak from the CPU flags"
        )
    elif name.startswith("warp_update"):
        out.append("ms: " + ", ".join(f"{k} {v}" for k, v in d["ms"].items()))
        out.append("")
        out.append("ratios: " + ", ".join(f"{k} {fmt(v)}" for k, v in d["ratios"].items()))
    elif name.startswith("meta_step"):
        out += [
            "| config | meta-batch | parallel | meta step (s) | in unit steps | unit (ms) "
            "| warp updates |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["runs"]:
            out.append(
                f"| {r['config']} | {r['meta_batch']} | {r['parallel']} | {r['meta_step_s']} | "
                f"{r['meta_step_in_inner_steps']} | {r['inner_step_ms_same_time']} | "
                f"{r['warp_updates']} |"
            )
        if d.get("parallel_ratios"):
            out.append("")
            out.append("parallel / sequential: " + json.dumps(d["parallel_ratios"]))
        same = d.get("vs_reference_same_machine")
        if same:
            out += [
                "",
                "| against the reference code on this machine | reference | warpkeras | ratio |",
                "|---|---|---|---|",
            ]
            for key, v in same.items():
                if isinstance(v, dict):
                    out.append(
                        f"| {key} | {fmt(v['reference'])} | {fmt(v['warpkeras'])} | "
                        f"{fmt(v['ratio'])} |"
                    )
    elif name.startswith("memory"):
        out.append("summary: " + json.dumps(d["summary"]))
    elif name.startswith("data_pipeline"):
        out.append("images/s: " + json.dumps(d["images_per_s"]))
        out.append("")
        out.append(
            f"consumed: {d['consumed_images_per_s']} images/s; pipeline / consumption: "
            + json.dumps(d["pipeline_over_consumption"])
        )
    if d.get("targets"):
        out += ["", targets_table(d["targets"])]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        print(section(os.path.basename(path)[:-5], d))


if __name__ == "__main__":
    main()
