"""Shared pieces of kickvm's benchmarks: run a VMM on the test guest, read its RESULT lines,
summarise repeated samples, print a table and draw a chart.

Every benchmark compares settings side by side in one run, interleaved round by round, and
reports medians with min-max: this machine is small and shared, so only figures taken together
can be compared.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KICKVM = ROOT / "target" / "release" / "kickvm"
GUEST = ROOT / "target" / "guest" / "kickvm-guest"
OUT = ROOT / "bench" / "out"

# QEMU's firmware output can precede the record on the same line.
RESULT_RE = re.compile(r"RESULT (workload=.*)$")


def build() -> None:
    """Builds kickvm and the bench tools (kick-floor, udp-peer) in release, and the test guest,
    once before any timing (skipped when BENCH_NO_BUILD is set, to measure the binaries already
    in target/)."""
    if os.environ.get("BENCH_NO_BUILD"):
        return
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "kickvm", "-p", "kick-floor", "-p", "udp-peer"],
                   cwd=ROOT, check=True)
    subprocess.run([str(ROOT / "guest" / "build.sh")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


@dataclass
class Run:
    """What one VMM process did: its RESULT records, timings and resource use."""

    cmd: list[str]
    exit_code: int
    results: list[dict[str, str]] = field(default_factory=list)
    first_result_s: float | None = None
    wall_s: float = 0.0
    max_rss_kib: int = 0
    output: str = ""

    def result(self, workload: str | None = None) -> dict[str, str]:
        for r in self.results:
            if workload is None or r.get("workload") == workload:
                return r
        raise RuntimeError(
            f"no RESULT{' for ' + workload if workload else ''} from {' '.join(self.cmd)}\n"
            f"exit {self.exit_code}, output:\n{self.output[-3000:]}"
        )


def parse_record(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def run_vmm(cmd: list[str], timeout: float = 300.0, env: dict[str, str] | None = None) -> Run:
    """Runs a VMM whose guest console is on stdout, timing the first RESULT line from process
    start. Peak RSS comes from wait4's rusage, so it is the VMM process's own."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    run = Run(cmd=cmd, exit_code=-1)
    lines: list[str] = []
    deadline = start + timeout
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n")
        lines.append(line)
        m = RESULT_RE.search(line)
        if m:
            if run.first_result_s is None:
                run.first_result_s = time.monotonic() - start
            run.results.append(parse_record(m.group(1)))
        if time.monotonic() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    run.wall_s = time.monotonic() - start
    run.exit_code = os.waitstatus_to_exitcode(status)
    run.max_rss_kib = usage.ru_maxrss
    run.output = "\n".join(lines)
    return run


def kickvm_cmd(workload_args: str, cpus: int = 1, memory: str = "512M", extra: list[str] | None = None) -> list[str]:
    return [
        str(KICKVM), "run", "--kernel", str(GUEST), "--cpus", str(cpus), "--memory", memory,
        "--cmdline", workload_args, *(extra or []),
    ]


def qemu_cmd(workload_args: str, cpus: int = 1, memory: str = "512M", extra: list[str] | None = None) -> list[str]:
    return [
        "qemu-system-x86_64", "-enable-kvm", "-M", "q35", "-smp", str(cpus), "-m", memory,
        "-kernel", str(GUEST), "-append", workload_args, "-nographic", "-monitor", "none",
        "-serial", "stdio", "-no-reboot", "-display", "none", *(extra or []),
    ]


@dataclass
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 0) -> str:
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def summarise(samples: list[float]) -> Summary:
    if not samples:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def svg_bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[Summary]], unit: str) -> None:
    """Grouped horizontal bars (one group per row of the table, one bar per setting), with
    min-max whiskers. Plain SVG: no plotting library needed on the machine."""
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    names = list(series)
    bar_h, gap, left, width = 14, 10, 260, 520
    top = 40
    height = top + len(groups) * (len(names) * bar_h + gap) + 30 + 18 * len(names)
    peak = max((s.hi for vals in series.values() for s in vals if s.n), default=1.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>',
    ]
    y = top
    for gi, group in enumerate(groups):
        out.append(f'<text x="10" y="{y + len(names) * bar_h / 2 + 4}">{group}</text>')
        for si, name in enumerate(names):
            s = series[name][gi]
            if s.n:
                w = width * s.median / peak
                out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{colors[si % len(colors)]}"/>')
                x0, x1 = left + width * s.lo / peak, left + width * s.hi / peak
                cy = y + (bar_h - 2) / 2
                out.append(f'<line x1="{x0:.1f}" y1="{cy}" x2="{x1:.1f}" y2="{cy}" stroke="black"/>')
                out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}">{s.median:.0f}</text>')
            y += bar_h
        y += gap
    for si, name in enumerate(names):
        out.append(f'<rect x="10" y="{y + 18 * si}" width="10" height="10" fill="{colors[si % len(colors)]}"/>')
        out.append(f'<text x="26" y="{y + 18 * si + 9}">{name} ({unit}; median, bar = min-max)</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def die(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(1)


__all__ = [
    "ROOT", "KICKVM", "GUEST", "OUT", "Run", "Summary", "build", "qemu_available", "run_vmm",
    "kickvm_cmd", "qemu_cmd", "summarise", "markdown_table", "svg_bar_chart", "die", "resource",
]
