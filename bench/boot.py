#!/usr/bin/env python3
"""Start-up and memory overhead: process start to the test guest's first RESULT line, kickvm and
QEMU booting the same ELF, interleaved; and kickvm's peak RSS minus the guest memory it touched.

usage: bench/boot.py [--runs N]
"""

import argparse
import re
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from kvmbench import (  # noqa: E402
    OUT, build, die, kickvm_cmd, markdown_table, qemu_available, qemu_cmd, run_vmm, summarise,
    svg_bar_chart,
)

# kickvm reports these at exit (info level): mincore over guest RAM and its own VmHWM. The
# VMM's own figure is used because ru_maxrss would include the launching process's pages.
MEMORY_RE = re.compile(r"guest memory touched: (\d+) KiB; kickvm peak RSS (\d+) KiB, overhead (\d+) KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if args.runs < 1:
        die("--runs must be at least 1")
    build()
    settings = {"kickvm": kickvm_cmd}
    if qemu_available():
        settings["qemu"] = qemu_cmd
    else:
        print("bench: qemu-system-x86_64 not found; kickvm only", file=sys.stderr)

    startup: dict[str, list[float]] = {name: [] for name in settings}
    overhead_kib: list[float] = []
    rss_kib: list[float] = []
    for _ in range(args.runs):
        for name, make in settings.items():
            run = run_vmm(make("workload=info"), timeout=120,
                          env={"RUST_LOG": "kickvm=info"} if name == "kickvm" else None)
            run.result("info")
            if run.exit_code != 0:
                die(f"{name} exited {run.exit_code}:\n{run.output[-2000:]}")
            startup[name].append(run.first_result_s * 1000)
            if name == "kickvm":
                m = MEMORY_RE.search(run.output)
                if m:
                    rss_kib.append(int(m.group(2)))
                    overhead_kib.append(int(m.group(3)))

    rows = []
    for name, samples in startup.items():
        rows.append([name, "start to first RESULT (ms)", summarise(samples).fmt(1), str(len(samples))])
    rows.append(["kickvm", "peak RSS (MiB)", summarise([k / 1024 for k in rss_kib]).fmt(1), str(len(rss_kib))])
    if overhead_kib:
        rows.append(["kickvm", "peak RSS - guest memory touched (MiB)",
                     summarise([k / 1024 for k in overhead_kib]).fmt(1), str(len(overhead_kib))])
    else:
        rows.append(["kickvm", "peak RSS - guest memory touched (MiB)", "not reported by kickvm", "0"])
    print(markdown_table(["vmm", "measure", "median (min-max)", "runs"], rows))
    chart = OUT / "boot.svg"
    svg_bar_chart(chart, "Process start to first RESULT line (ms)", ["workload=info"],
                  {name: [summarise(s)] for name, s in startup.items()}, "ms")
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
