#!/usr/bin/env bash
# Fetches the Debian cloud kernel and builds a tiny initramfs for the Linux smoke test.
# Output (printed at the end): target/linux/vmlinuz and target/linux/initramfs.cpio.gz.
# The init in the initramfs prints a line and reboots; on PVM hosts Linux never gets that far
# (user mode cannot run there), on hardware KVM it ends the VM through the i8042 reset.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/linux"
mkdir -p "$out"
cd "$out"

need() { command -v "$1" >/dev/null 2>&1; }

if [ ! -s vmlinuz ]; then
    if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        apt-get update -qq
    fi
    # The metapackage names the current kernel package; download that one.
    pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    if [ -z "$pkg" ]; then
        echo "fetch-linux: cannot find the Debian cloud kernel package" >&2
        exit 1
    fi
    rm -rf pkg ./*.deb
    apt-get download -q "$pkg" >apt.log 2>&1 || { cat apt.log >&2; exit 1; }
    dpkg -x ./"$pkg"_*.deb pkg
    cp pkg/boot/vmlinuz-* vmlinuz
    echo "$pkg" > kernel-package
    rm -rf pkg ./*.deb
fi

if [ ! -s initramfs.cpio.gz ]; then
    need cpio || { apt-get install -y -qq cpio >/dev/null; }
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    cat > "$work/init.S" <<'ASM'
    .globl _start
    .text
_start:
    mov $1, %eax            /* write(1, msg, len) */
    mov $1, %edi
    lea msg(%rip), %rsi
    mov $len, %edx
    syscall
    mov $169, %eax          /* reboot(MAGIC1, MAGIC2, RESTART) */
    mov $0xfee1dead, %edi
    mov $672274793, %esi
    mov $0x01234567, %edx
    syscall
1:  jmp 1b
    .data
msg: .ascii "kickvm-smoke: init reached\n"
    len = . - msg
ASM
    as -o "$work/init.o" "$work/init.S"
    mkdir -p "$work/root/dev"
    ld -static -o "$work/root/init" "$work/init.o"
    (cd "$work/root" && find . | cpio -o -H newc --quiet) | gzip -9 > initramfs.cpio.gz
fi

echo "$out/vmlinuz"
echo "$out/initramfs.cpio.gz"
