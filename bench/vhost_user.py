#!/usr/bin/env python3
"""vhost-user-blk figures: the same qemu-storage-daemon backend driven by kickvm with the kick as
a host notifier (ioeventfd=on: KVM signals the backend, no kickvm thread wakes) and as a sync
exit (ioeventfd=off: the vCPU thread signals it), by QEMU's vhost-user-blk-pci, beside kickvm's
built-in virtio-blk on the same image; same guest ELF, vCPUs and memory; interleaved rounds;
medians with min-max.

usage: bench/vhost_user.py [--rounds N] [--secs N] [--size-mib N] [--kicks N]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvmbench import (  # noqa: E402
    OUT, build, die, kickvm_cmd, markdown_table, qemu_available, qemu_cmd, run_vmm, summarise,
    svg_bar_chart,
)

MEMORY = "512M"
# name: guest arguments (blk-bench rows report iops, kick-bench ns_per_kick)
ROWS = {
    "kick (ns)": "workload=kick-bench n={kicks}",
    "4k-randread-qd1 poll": "workload=blk-bench rw=randread bs=4096 qd=1 secs={secs} completion=poll",
    "4k-randread-qd1 irq": "workload=blk-bench rw=randread bs=4096 qd=1 secs={secs} completion=irq",
    "4k-randread-qd32 poll": "workload=blk-bench rw=randread bs=4096 qd=32 secs={secs} completion=poll",
}


class Daemon:
    """qemu-storage-daemon exporting `image` as vhost-user-blk on a fresh socket."""

    def __init__(self, image: Path, workdir: Path):
        self.socket = workdir / f"blk-{time.monotonic_ns()}.sock"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=raw,node-name=disk0,file=file0",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,"
                         f"addr.type=unix,addr.path={self.socket}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                die("qemu-storage-daemon did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.socket.unlink(missing_ok=True)


def settings(image: Path) -> dict:
    def kick_vhost(io: str):
        return lambda sock, args: kickvm_cmd(args, memory=MEMORY, extra=[
            "--disk", f"socket={sock},ioeventfd={io}"])

    def qemu_vhost(sock, args):
        return qemu_cmd(args, memory=MEMORY, extra=[
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY},share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vu0,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1",
        ])

    out = {
        "kickvm-vhost-user-hostnotifier": (True, kick_vhost("on")),
        "kickvm-vhost-user-sync": (True, kick_vhost("off")),
    }
    if qemu_available():
        out["qemu-vhost-user"] = (True, qemu_vhost)
    out["kickvm-builtin-ioeventfd"] = (False, lambda _sock, args: kickvm_cmd(
        args, memory=MEMORY, extra=["--disk", f"path={image},ioeventfd=on"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--kicks", type=int, default=20000)
    args = ap.parse_args()
    build()
    image = OUT / "vhost-user-bench.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    if not image.exists() or image.stat().st_size != args.size_mib << 20:
        subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={args.size_mib}",
                        "status=none"], check=True)
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)

    samples: dict[tuple[str, str], list[float]] = {}
    failures: list[str] = []
    names = list(settings(image))
    with tempfile.TemporaryDirectory(prefix="kickvm-vu-bench-") as tmp:
        for rnd in range(args.rounds):
            for row, guest in ROWS.items():
                guest = guest.format(kicks=args.kicks, secs=args.secs)
                for name, (needs_daemon, make) in settings(image).items():
                    daemon = Daemon(image, Path(tmp)) if needs_daemon else None
                    try:
                        run = run_vmm(make(daemon.socket if daemon else None, guest), timeout=120)
                    finally:
                        if daemon:
                            daemon.stop()
                    workload = guest.split()[0].split("=")[1]
                    try:
                        res = run.result(workload)
                    except RuntimeError:
                        res = {"status": "no-result"}
                    if res.get("status") != "ok":
                        # Reported under the table, not fatal: QEMU 7.2's vhost-user-blk-pci
                        # with this guest loses its ring ("vhost VQ 0 ring restore failed") and
                        # the daemon panics.
                        failures.append(f"{name} {row}: {res.get('status')} "
                                        f"(timeouts={res.get('timeouts', '?')})")
                        print(f"round {rnd + 1} {row} {name}: FAILED", file=sys.stderr)
                        continue
                    value = float(res["ns_per_kick"] if workload == "kick-bench" else res["iops"])
                    samples.setdefault((row, name), []).append(value)
                    print(f"round {rnd + 1} {row} {name}: {value:.0f}", file=sys.stderr)

    table, groups, series = [], [], {n: [] for n in names}
    for row in ROWS:
        cells = [summarise(samples.get((row, n), [])) for n in names]
        table.append([row, *(c.fmt() for c in cells)])
        if row.startswith("kick"):
            continue
        groups.append(row)
        for n, c in zip(names, cells):
            series[n].append(c)
    print(f"\nvhost-user-blk (qemu-storage-daemon backend): IOPS, or ns per kick; median (min-max) "
          f"of {args.rounds} interleaved rounds, {args.secs} s each\n")
    print(markdown_table(["row", *names], table))
    if failures:
        print(f"\n{len(failures)} runs failed: " + "; ".join(failures))
    svg_bar_chart(OUT / "vhost_user.svg", "vhost-user-blk IOPS", groups, series, "IOPS")


if __name__ == "__main__":
    main()
