#!/usr/bin/env python3
"""virtio-blk figures: kickvm ioeventfd=on/off (and on with engine=io_uring), QEMU virtio-blk-pci ioeventfd=on/off and fio on
the host file (the backend's ceiling), same guest ELF, image, vCPUs and memory; interleaved
rounds; medians with min-max. Then the notify path alone (kick-bench) under the four VMM
settings beside the bare-KVM floors from bench/kick-floor.

usage: bench/blk.py [--rounds N] [--secs N] [--image PATH] [--size-mib N] [--rows a,b,...]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvmbench import (  # noqa: E402
    OUT, ROOT, build, die, kickvm_cmd, markdown_table, qemu_available, qemu_cmd, run_vmm,
    summarise, svg_bar_chart,
)

# name: (rw, bs, qd, vcpus)
JOBS = {
    "4k-randread-qd1": ("randread", 4096, 1, 1),
    "4k-randread-qd32": ("randread", 4096, 32, 1),
    "4k-randread-2x16": ("randread", 4096, 16, 2),
    "4k-randwrite-qd32": ("randwrite", 4096, 32, 1),
    "128k-read-qd8": ("read", 131072, 8, 1),
}
COMPLETIONS = ["poll", "irq"]


def vmm_settings(image: Path, vcpus: int) -> dict:
    def kick(io: str, engine: str = "auto"):
        def make(args: str):
            disk = f"path={image},ioeventfd={io},queues={vcpus},engine={engine}"
            return kickvm_cmd(args, cpus=vcpus, extra=["--disk", disk])
        return make

    def qemu(io: str):
        def make(args: str):
            return qemu_cmd(args, cpus=vcpus, extra=[
                "-drive", f"file={image},if=none,id=d0,format=raw,aio=threads",
                "-device", f"virtio-blk-pci,drive=d0,ioeventfd={io},num-queues={vcpus}",
            ])
        return make

    # kickvm-io_uring: the same ioeventfd path with every read through io_uring, without the
    # default engine's copies of cached pages out of a mapping of the image.
    settings = {"kickvm-ioeventfd": kick("on"), "kickvm-sync": kick("off"),
                "kickvm-io_uring": kick("on", "io_uring")}
    if qemu_available():
        settings |= {"qemu-ioeventfd": qemu("on"), "qemu-sync": qemu("off")}
    return settings


def fio_iops(image: Path, rw: str, bs: int, qd: int, jobs: int, secs: int) -> float:
    out = subprocess.run(
        ["fio", "--name=ceiling", f"--filename={image}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
         f"--numjobs={jobs}", "--group_reporting", "--ioengine=io_uring", "--invalidate=0",
         "--time_based", f"--runtime={secs}", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout
    job = json.loads(out)["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--image", type=Path, default=OUT / "blk-bench.img")
    ap.add_argument("--rows", default=",".join(JOBS))
    ap.add_argument("--kicks", type=int, default=20000)
    args = ap.parse_args()
    rows = args.rows.split(",")
    for r in rows:
        if r not in JOBS:
            die(f"unknown row {r!r}; rows: {', '.join(JOBS)}")
    build()
    args.image.parent.mkdir(parents=True, exist_ok=True)
    if not args.image.exists() or args.image.stat().st_size != args.size_mib << 20:
        subprocess.run(["dd", "if=/dev/urandom", f"of={args.image}", "bs=1M", f"count={args.size_mib}",
                        "status=none"], check=True)
    # Warm the page cache so every setting reads the same cached file.
    subprocess.run(["cat", str(args.image)], stdout=subprocess.DEVNULL, check=True)

    have_fio = subprocess.run(["which", "fio"], capture_output=True).returncode == 0
    samples: dict[tuple[str, str, str], list[float]] = {}
    rejected: list[str] = []
    names: list[str] = []
    # Interrupts the guest took per request in the irq rows: what a completion costs it.
    per_request: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for row in rows:
            rw, bs, qd, vcpus = JOBS[row]
            for completion in COMPLETIONS:
                guest = f"workload=blk-bench rw={rw} bs={bs} qd={qd} secs={args.secs} completion={completion}"
                for name, make in vmm_settings(args.image, vcpus).items():
                    if name not in names:
                        names.append(name)
                    for _attempt in range(3):
                        run = run_vmm(make(guest), timeout=120 + args.secs)
                        res = run.result("blk-bench")
                        if res.get("status") != "ok":
                            die(f"{name} {row}: {res}")
                        # The guest times its run with a TSC it calibrated against the PIT; on
                        # a busy host that can come out wrong, and then the run lasts longer
                        # (rate too high: IOPS inflated, seen 756k and 1M) or shorter (too
                        # low: deflated) than `secs` of wall time. Such a run is dropped and
                        # run again. Boot time is allowed for (QEMU's firmware takes seconds).
                        boot_allowance = 15.0 if name.startswith("qemu") else 2.0
                        if 0.9 * args.secs <= run.wall_s <= 1.5 * args.secs + boot_allowance:
                            break
                        rejected.append(f"{name} {row} {completion}: {res['iops']} IOPS in {run.wall_s:.2f} s")
                        print(f"discarded (guest clock wrong): {rejected[-1]}", file=sys.stderr)
                    else:
                        die(f"{name} {row}: the guest's clock was wrong three times")
                    samples.setdefault((row, completion, name), []).append(float(res["iops"]))
                    if completion == "irq" and "interrupts" in res and int(res["ops"]):
                        per_request.setdefault((row, name), []).append(int(res["interrupts"]) / int(res["ops"]))
                    print(f"round {rnd + 1} {row} {completion} {name}: {res['iops']} IOPS", file=sys.stderr)
            if have_fio:
                samples.setdefault((row, "host", "fio"), []).append(
                    fio_iops(args.image, rw, bs, qd, vcpus, args.secs))

    header = ["job", "completion", *names, "fio (host)", "ioeventfd/sync"]
    table = []
    chart_groups, chart_series = [], {n: [] for n in names}
    for row in rows:
        fio = summarise(samples.get((row, "host", "fio"), []))
        for completion in COMPLETIONS:
            cells = [summarise(samples.get((row, completion, n), [])) for n in names]
            ratio = cells[0].median / cells[1].median if cells[1].n else float("nan")
            table.append([row, completion, *(c.fmt() for c in cells), fio.fmt() if fio.n else "-", f"{ratio:.2f}x"])
            chart_groups.append(f"{row} {completion}")
            for n, c in zip(names, cells):
                chart_series[n].append(c)
    print(f"\n4 KiB/128 KiB IOPS, median (min-max) of {args.rounds} interleaved rounds, {args.secs} s each\n")
    print(markdown_table(header, table))
    print("\nInterrupts taken per request, completion=irq (median (min-max))\n")
    print(markdown_table(["job", *names], [
        [row, *(summarise(per_request.get((row, n), [])).fmt(2) for n in names)] for row in rows]))
    if rejected:
        print(f"\n{len(rejected)} runs discarded and run again (guest clock wrong): " + "; ".join(rejected))
    svg_bar_chart(OUT / "blk.svg", "virtio-blk IOPS", chart_groups, chart_series, "IOPS")

    # The notify path alone.
    floors = subprocess.run([str(ROOT / "target" / "release" / "kick-floor"), "--kicks", str(args.kicks),
                             "--rounds", str(args.rounds)], capture_output=True, text=True, check=True).stdout
    kick: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, make in vmm_settings(args.image, 1).items():
            run = run_vmm(make(f"workload=kick-bench n={args.kicks}"), timeout=120)
            kick.setdefault(name, []).append(float(run.result("kick-bench")["ns_per_kick"]))
    krows = [[n, summarise(s).fmt(), str(len(s))] for n, s in kick.items()]
    for line in floors.splitlines():
        f = dict(w.split("=", 1) for w in line.split()[1:])
        krows.append([f"floor: {f['setting']}", f"{f['ns_per_kick']} ({f['min']}-{f['max']})", f["rounds"]])
    print("\nkick-bench: ns per kick with nothing to do, median (min-max)\n")
    print(markdown_table(["setting", "ns/kick", "runs"], krows))
    print(f"\ncharts: {OUT / 'blk.svg'}")


if __name__ == "__main__":
    main()
