#!/usr/bin/env python3
"""virtio-blk reads when the image does not fit the host's page cache: kickvm's default engine
(io_uring with cached reads copied out of a mapping) against io_uring alone, each VMM in a
memory cgroup that holds the page cache it may use to a fraction of the image, with the image's
cache dropped before every run. Interleaved rounds; medians with min-max.

usage: bench/blk_pressure.py [--rounds N] [--secs N] [--limit-mib N] [--image PATH] [--size-mib N]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvmbench import OUT, build, die, kickvm_cmd, markdown_table, run_vmm, summarise  # noqa: E402

SETTINGS = {"kickvm-auto": "auto", "kickvm-io_uring": "io_uring"}
QUEUE_DEPTHS = [1, 32]


class MemoryCgroup:
    """A memory cgroup (v2 where its memory controller is, else v1) limited to `limit` bytes;
    removed on exit."""

    def __init__(self, name: str, limit: int):
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            self.path, self.limit_file, self.tasks = v2 / name, "memory.max", "cgroup.procs"
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.path = Path("/sys/fs/cgroup/memory") / name
            self.limit_file, self.tasks = "memory.limit_in_bytes", "tasks"
        else:
            die("no memory cgroup controller (v2 or v1) on this host")
        self.path.mkdir(exist_ok=True)
        (self.path / self.limit_file).write_text(str(limit))

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, run inside the cgroup."""
        return ["sh", "-c", f'echo $$ > {self.path / self.tasks} && exec "$@"', "sh", *cmd]

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def drop_cache(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--limit-mib", type=int, default=384, help="memory the VMM's cgroup may use")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--image", type=Path, default=OUT / "blk-bench.img")
    args = ap.parse_args()
    if os.geteuid() != 0:
        die("needs root (it creates a memory cgroup)")
    build()
    args.image.parent.mkdir(parents=True, exist_ok=True)
    if not args.image.exists() or args.image.stat().st_size != args.size_mib << 20:
        subprocess.run(["dd", "if=/dev/urandom", f"of={args.image}", "bs=1M", f"count={args.size_mib}",
                        "status=none"], check=True)
    cgroup = MemoryCgroup(f"kickvm-bench-{os.getpid()}", args.limit_mib << 20)
    iops: dict[tuple[int, str], list[float]] = {}
    p99: dict[tuple[int, str], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            for qd in QUEUE_DEPTHS:
                for name, engine in SETTINGS.items():
                    drop_cache(args.image)
                    guest = f"workload=blk-bench rw=randread qd={qd} secs={args.secs} completion=poll"
                    cmd = kickvm_cmd(guest, extra=["--disk", f"path={args.image},engine={engine}"])
                    result = run_vmm(cgroup.wrap(cmd), timeout=args.secs + 60).result("blk-bench")
                    iops.setdefault((qd, name), []).append(float(result["iops"]))
                    p99.setdefault((qd, name), []).append(float(result["lat_p99_us"]))
                    print(f"round {rnd + 1} qd{qd} {name}: {result['iops']} IOPS, p99 {result['lat_p99_us']} us",
                          file=sys.stderr)
    finally:
        cgroup.remove()
    print(f"\n4 KiB random reads, polled, 1 vCPU, {args.size_mib} MiB image, VMM cgroup limited to "
          f"{args.limit_mib} MiB, cache dropped before each run; median (min-max) of {args.rounds} "
          f"interleaved rounds of {args.secs} s\n")
    header = ["depth", *(f"{n} IOPS" for n in SETTINGS), *(f"{n} p99 us" for n in SETTINGS)]
    rows = [[str(qd), *(summarise(iops[(qd, n)]).fmt() for n in SETTINGS),
             *(summarise(p99[(qd, n)]).fmt() for n in SETTINGS)] for qd in QUEUE_DEPTHS]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
