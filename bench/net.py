#!/usr/bin/env python3
"""virtio-net figures: guest-to-host and host-to-guest UDP packet rate and Mbit/s (UDP payload)
for 64-, 200- and 1400-byte payloads, and 200-byte UDP echo round trips (median, p99), for
kickvm ioeventfd=on/off/auto and QEMU virtio-net-pci (tap, vhost=off) ioeventfd=on/off, on the
same guest ELF, 1 vCPU, in a throwaway network namespace. Rounds are interleaved (every setting
once per round); medians with min-max.

The host ends of the packet-rate runs are native (bench/udp-peer: a sendmmsg source for h2g, a
recvmmsg sink for g2h), so they outpace the VMM; ARP warm-up and the echo round trips stay in
tests/net_peer.py.

usage: bench/net.py [--rounds N] [--secs N] [--rtt-samples N] [--settings a,b,...]
                    [--only g2h,h2g,echo] [--sizes 64,200,1400] [--completion poll|irq]
                    [--poll-us N] [--no-build]
"""

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvmbench import (  # noqa: E402
    OUT, ROOT, build, die, kickvm_cmd, markdown_table, qemu_available, qemu_cmd, summarise,
    svg_bar_chart,
)

PEER = ROOT / "tests" / "net_peer.py"
# The packet-rate peer: Python's one sendto/recvfrom per datagram, not the VMM, set the rate.
UDP_PEER = ROOT / "target" / "release" / "udp-peer"
HOST_IP, GUEST_IP, TAP = "10.0.0.1", "10.0.0.2", "btap0"
SIZES = [64, 200, 1400]
RTT_SIZE = 200
COMPLETION = "poll"  # the guest's RX completion (--completion)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Netns:
    def __init__(self, name: str):
        self.name = name
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        sh("ip", "netns", "add", name)
        for cmd in (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                    ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP],
                    ["ip", "link", "set", TAP, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", name, *cmd)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def peer(self, *args: str, timeout: float = 120) -> dict[str, str]:
        """Runs tests/net_peer.py in the namespace; its last line's key=value fields."""
        return self._run(["python3", str(PEER), *args], timeout)

    def udp_peer(self, *args: str, timeout: float = 120) -> dict[str, str]:
        """Runs the native bench/udp-peer in the namespace; its last line's key=value fields."""
        return self._run([str(UDP_PEER), *args], timeout)

    def _run(self, cmd: list[str], timeout: float) -> dict[str, str]:
        out = subprocess.run([*self.prefix(), *cmd], capture_output=True,
                             text=True, timeout=timeout, check=True).stdout
        return dict(w.split("=", 1) for w in out.strip().splitlines()[-1].split() if "=" in w)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Vm:
    """A VMM run whose console is read live: `wait_net()` returns once the guest driver is up."""

    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self.lines: list[str] = []
        self.net_up = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\r\n")
            self.lines.append(line)
            if "NET index=" in line:
                self.net_up.set()

    def wait_net(self, timeout: float = 90) -> None:
        if not self.net_up.wait(timeout):
            self.proc.kill()
            raise RuntimeError(f"no NET line from {' '.join(self.cmd)}:\n" + "\n".join(self.lines[-30:]))

    def result(self, workload: str, timeout: float = 120) -> dict[str, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(5)
        for line in self.lines:
            at = line.find(f"RESULT workload={workload} ")
            if at >= 0:
                r = dict(w.split("=", 1) for w in line[at:].split()[1:] if "=" in w)
                if r.get("status") == "ok":
                    return r
        raise RuntimeError(f"no RESULT {workload} from {' '.join(self.cmd)}:\n" + "\n".join(self.lines[-30:]))


def settings(ns: Netns, poll_us: int | None) -> dict:
    def kick(io: str, extra_opt: str = ""):
        return lambda args: [*ns.prefix(), *kickvm_cmd(args, extra=["--net", f"tap={TAP},ioeventfd={io}{extra_opt}"])]

    def qemu(io: str):
        return lambda args: [*ns.prefix(), *qemu_cmd(args, extra=[
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,ioeventfd={io},romfile=",
        ])]

    s = {"kickvm-on": kick("on"), "kickvm-off": kick("off"), "kickvm-auto": kick("auto")}
    if poll_us is not None:
        # kickvm-auto stays kickvm's default; this one sets the reply wait explicitly.
        s[f"kickvm-auto-p{poll_us}"] = kick("auto", f",poll_us={poll_us}")
    if qemu_available():
        s |= {"qemu-on": qemu("on"), "qemu-off": qemu("off")}
    return s


def guest_to_host(ns: Netns, make, size: int, secs: int) -> tuple[float, float, float]:
    sink = subprocess.Popen([*ns.prefix(), str(UDP_PEER), "sink", f"{HOST_IP}:9000", "3"],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "sink ready"
    vm = Vm(make(f"workload=net-tx ip={GUEST_IP}/24 dst={HOST_IP}:9000 size={size} secs={secs}"))
    r = vm.result("net-tx")
    seen = dict(w.split("=", 1) for w in sink.communicate(timeout=60)[0].split() if "=" in w)
    sent, got = int(r["packets"]), int(seen["packets"])
    loss = 100.0 * (sent - got) / sent if sent else 0.0
    return float(r["pps"]), float(r["mbps"]), loss


def host_to_guest(ns: Netns, make, size: int, secs: int) -> tuple[float, float]:
    vm = Vm(make(f"workload=net-rx ip={GUEST_IP}/24 secs={secs + 3} completion={COMPLETION}"))
    vm.wait_net()
    ns.peer("ping", GUEST_IP, "1")  # ARP first: the neighbour queue drops what waits for it
    ns.udp_peer("source", f"{GUEST_IP}:9001", str(size), str(secs))
    r = vm.result("net-rx")
    return float(r["pps"]), float(r["mbps"])


def echo_rtt(ns: Netns, make, samples: int) -> tuple[float, float]:
    vm = Vm(make(f"workload=net-echo ip={GUEST_IP}/24 secs=600 completion={COMPLETION}"))
    vm.wait_net()
    ns.peer("rtt", GUEST_IP, "16", "50")  # warm-up: ARP, caches
    r = ns.peer("rtt", GUEST_IP, str(RTT_SIZE), str(samples), timeout=300)
    if int(r["lost"]) or int(r["n"]) < samples:
        print(f"  echo: {r['n']} of {samples} samples, {r['lost']} lost", file=sys.stderr)
    vm.proc.kill()
    vm.proc.wait()
    return float(r["median_us"]), float(r["p99_us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--rtt-samples", type=int, default=2000)
    ap.add_argument("--settings", default="")
    ap.add_argument("--poll-us", type=int, default=None, help="also run kickvm-auto-pN: auto with poll_us=N")
    ap.add_argument("--only", default="g2h,h2g,echo", help="which measurements (g2h, h2g, echo)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="payload sizes for g2h/h2g")
    ap.add_argument("--completion", choices=["poll", "irq"], default="poll",
                    help="the guest's RX completion for h2g and echo (g2h polls either way)")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    global COMPLETION
    COMPLETION = args.completion
    if not args.no_build:
        build()
    if not UDP_PEER.exists():
        die(f"{UDP_PEER} is missing: cargo build --release -p udp-peer")
    ns = Netns(f"kvmbench-{int(time.time()) % 100000}")
    try:
        all_settings = settings(ns, args.poll_us)
        names = [n for n in all_settings if not args.settings or n in args.settings.split(",")]
        only = set(args.only.split(","))
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = []
        for kind in ("g2h", "h2g"):
            if kind in only:
                rows += [f"{kind} {s}B pps" for s in sizes] + [f"{kind} {s}B Mbit/s" for s in sizes]
        if "echo" in only:
            rows += [f"echo {RTT_SIZE}B RTT median us", f"echo {RTT_SIZE}B RTT p99 us"]
        samples = {n: {r: [] for r in rows} for n in names}
        losses = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in names:
                make = all_settings[name]
                for size in sizes:
                    if "g2h" in only:
                        pps, mbps, loss = guest_to_host(ns, make, size, args.secs)
                        samples[name][f"g2h {size}B pps"].append(pps)
                        samples[name][f"g2h {size}B Mbit/s"].append(mbps)
                        losses[name].append(loss)
                    if "h2g" in only:
                        pps, mbps = host_to_guest(ns, make, size, args.secs)
                        samples[name][f"h2g {size}B pps"].append(pps)
                        samples[name][f"h2g {size}B Mbit/s"].append(mbps)
                if "echo" in only:
                    med, p99 = echo_rtt(ns, make, args.rtt_samples)
                    samples[name][f"echo {RTT_SIZE}B RTT median us"].append(med)
                    samples[name][f"echo {RTT_SIZE}B RTT p99 us"].append(p99)
                print(f"round {rnd + 1} {name}: " + ", ".join(
                    f"{r}={samples[name][r][-1]:.0f}" for r in rows), file=sys.stderr, flush=True)
            report(names, rows, samples, losses, rnd + 1, args.secs)
    finally:
        ns.close()


def report(names, rows, samples, losses, rounds, secs) -> None:
    """Writes the table and charts for the rounds so far (a cut-short run still leaves them)."""
    table = markdown_table(["metric", *names], [
        [r, *(summarise(samples[n][r]).fmt() for n in names)] for r in rows])
    loss_line = ", ".join(f"{n} {max(losses[n]):.2f}%" for n in names if losses[n])
    text = (f"virtio-net, 1 vCPU, UDP over tap, guest RX completion {COMPLETION}, "
            f"{rounds} interleaved rounds of {secs} s, "
            f"median (min-max); Mbit/s = UDP payload\n\n{table}\n\n"
            f"largest guest-to-host loss (device took, host socket did not see): {loss_line}\n")
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "net.md").write_text(text)
    pps_rows = [r for r in rows if r.endswith("pps")]
    svg_bar_chart(OUT / "net-pps.svg", "virtio-net UDP packets/s (1 vCPU)", pps_rows,
                  {n: [summarise(samples[n][r]) for r in pps_rows] for n in names}, "packets/s")
    rtt_rows = [r for r in rows if "RTT" in r]
    svg_bar_chart(OUT / "net-rtt.svg", "virtio-net UDP echo round trip, 200 B (lower is better)", rtt_rows,
                  {n: [summarise(samples[n][r]) for r in rtt_rows] for n in names}, "µs")
    print(f"wrote {OUT / 'net.md'}, {OUT / 'net-pps.svg'}, {OUT / 'net-rtt.svg'}")


if __name__ == "__main__":
    main()
