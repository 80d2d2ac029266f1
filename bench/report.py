"""Turn a pytest-benchmark JSON file into a markdown table: per group, each implementation's median
time, peak extra memory (CUDA), achieved bandwidth where the benchmark counts its bytes, and how many
times slower it is than ours (same run, same device)."""

import argparse
import json
import re
from collections import defaultdict


def impl_name(bench):
    return re.search(r"-([a-z_]+)\]$", bench["name"]).group(1)


def render(data, title):
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][impl_name(bench)] = bench
    machine = data.get("machine_info", {})
    lines = [f"# {title}", "", f"Device: {next(iter(data['benchmarks']))['extra_info'].get('device', '?')}; "
             f"host {machine.get('cpu', {}).get('brand_raw', '?')}; {data.get('datetime', '')}", ""]
    for group, impls in groups.items():
        ours = impls.get("ours")
        lines += [f"## {group}", "", "| impl | median ms | peak extra MiB | GB/s (bytes counted) | time / ours |",
                  "|---|---|---|---|---|"]
        for name, bench in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["median"]):
            median = bench["stats"]["median"]
            ratio = f"{median / ours['stats']['median']:.2f}x" if ours else "-"
            mem = bench["extra_info"].get("peak_extra_mib", "-")
            moved = bench["extra_info"].get("bytes_moved")
            bandwidth = f"{moved / median / 1e9:.1f}" if moved else "-"
            lines.append(f"| {name} | {1e3 * median:.3f} | {mem} | {bandwidth} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--title", default="Benchmark results")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(render(json.load(f), args.title))


if __name__ == "__main__":
    main()
