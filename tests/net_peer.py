"""The host side of tests/net.rs and bench/net.py, run inside the test's network namespace.

  ping DST COUNT               ICMP echo (raw socket), payloads checked; prints `ping sent= ok= rtt_us=`
  echo DST TOTAL_BYTES SIZES   UDP echo to DST:7, stop-and-wait, every reply byte-checked;
                               prints `echo datagrams= bytes= mismatches= retries= lost=`
  rtt DST SIZE COUNT           UDP echo round trips; prints `rtt n= median_us= p99_us= lost=`
  sink BIND:PORT IDLE_S        counts UDP datagrams until IDLE_S without one (after the first);
                               prints `sink packets= bytes= unique=` (ready line first: `sink ready`)
  source DST:PORT SIZE SECS    sends datagrams as fast as sendto allows; prints `source packets=`
  stop DST                     ends the guest's net-echo/net-rx early (datagrams to port 9)
"""

import os
import socket
import statistics
import struct
import sys
import time


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ping(dst: str, count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(1.0)
    ident = os.getpid() & 0xFFFF
    ok = 0
    rtts = []
    for seq in range(count):
        payload = bytes((seq + i) & 0xFF for i in range(56))
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, icmp_checksum(header + payload), ident, seq) + payload
        start = time.perf_counter()
        sock.sendto(packet, (dst, 0))
        deadline = start + 1.0
        while time.perf_counter() < deadline:
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                break
            icmp = data[(data[0] & 0xF) * 4:]
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if addr[0] == dst and typ == 0 and rid == ident and rseq == seq:
                if icmp[8:] == payload and icmp_checksum(icmp) == 0:
                    ok += 1
                    rtts.append((time.perf_counter() - start) * 1e6)
                break
    rtt = int(statistics.median(rtts)) if rtts else 0
    print(f"ping sent={count} ok={ok} rtt_us={rtt}", flush=True)


def echo(dst: str, total: int, sizes: list[int], max_secs: float = 50.0) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    sent_bytes = datagrams = mismatches = retries = lost = 0
    seq = 0
    give_up = time.perf_counter() + max_secs
    while sent_bytes < total and time.perf_counter() < give_up:
        size = sizes[seq % len(sizes)]
        body = struct.pack("!Q", seq)[-min(8, size):] + bytes(((seq * 7 + i) & 0xFF) for i in range(max(0, size - 8)))
        for attempt in range(5):
            sock.sendto(body, (dst, 7))
            try:
                while True:
                    reply, _ = sock.recvfrom(65536)
                    # A late reply to an earlier, retried datagram is skipped.
                    if reply[: min(8, size)] == body[: min(8, size)] or len(reply) != len(body):
                        break
            except socket.timeout:
                retries += 1
                continue
            if reply != body:
                mismatches += 1
            break
        else:
            lost += 1
        sent_bytes += size
        datagrams += 1
        seq += 1
    print(f"echo datagrams={datagrams} bytes={sent_bytes} mismatches={mismatches} retries={retries} lost={lost}", flush=True)


def rtt(dst: str, size: int, count: int, max_secs: float = 60.0) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    samples = []
    lost = 0
    give_up = time.perf_counter() + max_secs
    for seq in range(count):
        if time.perf_counter() > give_up:
            break
        body = struct.pack("!Q", seq) + bytes(max(0, size - 8))
        start = time.perf_counter()
        sock.sendto(body, (dst, 7))
        try:
            while True:
                reply, _ = sock.recvfrom(65536)
                if reply[:8] == body[:8]:
                    samples.append((time.perf_counter() - start) * 1e6)
                    break
        except socket.timeout:
            lost += 1
    samples.sort()
    med = statistics.median(samples) if samples else 0
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else 0
    print(f"rtt n={len(samples)} median_us={med:.1f} p99_us={p99:.1f} lost={lost}", flush=True)


def sink(bind: str, idle: float) -> None:
    host, port = bind.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: root, no loss here
    sock.bind((host, int(port)))
    print("sink ready", flush=True)
    packets = nbytes = 0
    seen = set()
    sock.settimeout(60.0)
    try:
        while True:
            data, _ = sock.recvfrom(65536)
            sock.settimeout(idle)
            packets += 1
            nbytes += len(data)
            seen.add(data[:8])
    except socket.timeout:
        pass
    print(f"sink packets={packets} bytes={nbytes} unique={len(seen)}", flush=True)


def source(dst: str, size: int, secs: float) -> None:
    host, port = dst.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    packets = 0
    body = bytearray(size)
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(64):
            body[:8] = struct.pack("!Q", packets)
            try:
                sock.sendto(body, (host, int(port)))
                packets += 1
            except OSError:
                pass
    print(f"source packets={packets}", flush=True)


def stop(dst: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Several, spaced: the first may meet a tap queue still full from a flood.
    for _ in range(5):
        sock.sendto(b"stop", (dst, 9))
        time.sleep(0.1)
    print("stop sent=5", flush=True)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "ping":
        ping(args[0], int(args[1]))
    elif mode == "echo":
        echo(args[0], int(args[1]), [int(s) for s in args[2].split(",")], float(args[3]) if len(args) > 3 else 50.0)
    elif mode == "rtt":
        rtt(args[0], int(args[1]), int(args[2]))
    elif mode == "sink":
        sink(args[0], float(args[1]))
    elif mode == "stop":
        stop(args[0])
    elif mode == "source":
        source(args[0], int(args[1]), float(args[2]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
