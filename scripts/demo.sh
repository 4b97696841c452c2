#!/usr/bin/env bash
# `make demo`: boot the test guest with a disk, show it working, print figures.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
kickvm=target/release/kickvm
guest=target/guest/kickvm-guest
work=target/demo
mkdir -p "$work"
img="$work/disk.img"
rm -f "$img"
truncate -s 256M "$img"

step() { printf '\n== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
result() { grep -E '^(RESULT|DONE)' || true; }

step "2 vCPUs, 1 GiB: what the guest sees" \
    $kickvm run --kernel $guest --cpus 2 --memory 1G --cmdline "workload=info"

printf '\n== virtio-blk: write, flush, read back and verify every block (ioeventfd on)\n'
$kickvm run --kernel $guest --cpus 2 --disk "path=$img" --cmdline "workload=blk-verify seed=42" | result

printf '\n== 4 KiB random reads, depth 32, polled: ioeventfd on vs off (3 s each)\n'
for io in on off; do
    printf 'ioeventfd=%-3s ' $io
    $kickvm run --kernel $guest --disk "path=$img,ioeventfd=$io" \
        --cmdline "workload=blk-bench rw=randread bs=4096 qd=32 secs=3" | grep '^RESULT' | cut -d' ' -f2-
done

printf '\n== the notify path alone: 20000 kicks with nothing to do\n'
for io in on off; do
    printf 'ioeventfd=%-3s ' $io
    $kickvm run --kernel $guest --disk "path=$img,ioeventfd=$io" \
        --cmdline "workload=kick-bench n=20000" | grep '^RESULT' | cut -d' ' -f2-
done
printf 'bare KVM floor: '
target/release/kick-floor --kicks 20000 --rounds 1 | tr '\n' ' '
printf '\n\nFull comparisons with QEMU and host fio: make bench (see README.md).\n'
