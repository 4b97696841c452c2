#!/bin/sh
# Build the test guest and install it at <repo>/target/guest/kickvm-guest.
# Works from any directory; prints the installed path as its last line.
set -eu
guest_dir=$(cd "$(dirname "$0")" && pwd)
repo_dir=$(dirname "$guest_dir")
out_dir="$repo_dir/target/guest"
cargo=${CARGO:-cargo}

# --target keeps the guest's rustflags (.cargo/config.toml) off build scripts.
# A caller's RUSTFLAGS would replace the guest's own flags; its CARGO_TARGET_DIR
# would move the output.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
(cd "$guest_dir" && "$cargo" build --release --quiet \
    --target x86_64-unknown-linux-gnu --target-dir "$guest_dir/target")

mkdir -p "$out_dir"
tmp="$out_dir/.kickvm-guest.$$"
cp "$guest_dir/target/x86_64-unknown-linux-gnu/release/kickvm-guest" "$tmp"
mv -f "$tmp" "$out_dir/kickvm-guest"
echo "$out_dir/kickvm-guest"
