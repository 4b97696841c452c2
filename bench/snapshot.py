#!/usr/bin/env python3
"""Snapshot and restore figures: how long the guest is stopped, and what a snapshot weighs.

Each round boots the test guest running blk-verify on a 64 MiB disk (2 vCPUs), lets it run,
then times over the control API: vm.pause, vm.snapshot, and a new kickvm started with --restore
until its disk serves requests again; the state and memory files are measured (apparent and
allocated size). Memory sizes alternate between rounds (256 MiB and 2 GiB of guest RAM, of
which the guest touches the same few MiB), so the sparse memory file's effect shows.

usage: bench/snapshot.py [--rounds N]
"""

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvmbench import GUEST, KICKVM, build, markdown_table, summarise  # noqa: E402


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(sock: str, method: str, op: str, body: dict | None = None) -> tuple[int, object]:
    conn = UnixHTTPConnection(sock)
    data = json.dumps(body).encode() if body is not None else b""
    conn.request(method, f"/api/v1/{op}", body=data, headers={"Content-Length": str(len(data))})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, (json.loads(raw) if raw else None)


def start(args: list[str], sock: str) -> subprocess.Popen:
    proc = subprocess.Popen([str(KICKVM), "run", "--kernel", str(GUEST), "--api-socket", sock, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock)
            return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"kickvm did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.001)


def requests(sock: str) -> int:
    _, counters = call(sock, "GET", "vm.counters")
    return sum(q["requests"] for d in counters["devices"] for q in d["queues"])


def one_round(work: Path, memory: str) -> dict[str, float]:
    snap = work / "snap"
    shutil.rmtree(snap, ignore_errors=True)
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    options = ["--cpus", "2", "--memory", memory, "--disk", f"path={image}",
               "--cmdline", "workload=blk-verify loops=1000000 completion=irq"]
    sock = str(work / "a.sock")
    first = start(options, sock)
    deadline = time.monotonic() + 30
    while requests(sock) < 1000:
        if time.monotonic() > deadline:
            sys.exit("the guest did no I/O")
        time.sleep(0.01)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert call(sock, "PUT", "vm.pause")[0] == 204
    t1 = time.monotonic()
    status, body = call(sock, "PUT", "vm.snapshot", {"destination_url": f"file://{snap}"})
    if status != 204:
        sys.exit(f"vm.snapshot: {status} {body}")
    t2 = time.monotonic()
    call(sock, "PUT", "vm.kill")
    first.wait(30)
    sock2 = str(work / "b.sock")
    t3 = time.monotonic()
    second = start([*options, "--restore", str(snap)], sock2)
    while requests(sock2) == 0:
        if second.poll() is not None or time.monotonic() > t3 + 30:
            sys.exit(f"the restored VM did no I/O: {second.stderr.read().decode() if second.stderr else ''}")
        time.sleep(0.0005)
    t4 = time.monotonic()
    call(sock2, "PUT", "vm.kill")
    second.wait(30)
    mem = (snap / "memory").stat()
    return {
        "pause_ms": (t1 - t0) * 1e3,
        "snapshot_ms": (t2 - t1) * 1e3,
        "restore_to_io_ms": (t4 - t3) * 1e3,
        "state_kib": (snap / "state.json").stat().st_size / 1024,
        "memory_mib_apparent": mem.st_size / (1 << 20),
        "memory_mib_allocated": mem.st_blocks * 512 / (1 << 20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    build()
    sizes = ["256M", "2G"]
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in sizes}
    with tempfile.TemporaryDirectory(prefix="kickvm-snapbench-", dir=Path(__file__).parent / "out") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for memory in sizes:
                for key, value in one_round(work, memory).items():
                    samples[memory].setdefault(key, []).append(value)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    keys = list(samples[sizes[0]])
    rows = [[key, *(summarise(samples[m][key]).fmt(1) for m in sizes)] for key in keys]
    print(f"Snapshot and restore, test guest blk-verify on 2 vCPUs, median (min-max) of {args.rounds} rounds\n")
    print(markdown_table(["figure", *(f"--memory {m}" for m in sizes)], rows))


if __name__ == "__main__":
    main()
