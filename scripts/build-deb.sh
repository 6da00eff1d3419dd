#!/usr/bin/env bash
# Builds the Debian package of consul-dns-forwarder with dpkg-deb (no debhelper, no cargo-deb):
#
#   scripts/build-deb.sh [OUT_DIR]     # default OUT_DIR: $CARGO_TARGET_DIR/debian (target/debian)
#   sudo apt install ./target/debian/consul-dns-forwarder_0.1.0-1_amd64.deb
#
# It runs `cargo build --release --locked` first, unless BIN names a release binary already
# built (the tests pass the one cargo built for them). Prints the path of the .deb on stdout.
# Contents:
#   /usr/bin/consul-dns-forwarder                 the release binary (no debug info: Cargo.toml)
#   /usr/lib/systemd/system/*                     the units of examples/systemd/, for /usr/bin,
#     consul-dns-forwarder.service.d/user.conf    run as the system user below (packaging/deb/)
#   /usr/lib/sysusers.d/consul-dns-forwarder.conf the system user, created by postinst
#   /etc/consul-dns-forwarder.toml                examples/systemd's config, a conffile
#   /usr/share/man/man1/, bash/zsh/fish completions  from `consul-dns-forwarder generate-assets`
# Checked by tests/it/packaging.rs (dpkg-deb -c/-I, an install into a scratch root,
# systemd-analyze verify, the installed binary's --version and check-config).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
out=${1:-$target/debian}
name=consul-dns-forwarder
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
# Debian revision 1 of the upstream version.
deb_version=$version-1
arch=$(dpkg --print-architecture)

if [[ -z ${BIN:-} ]]; then
  cargo build --release --locked --bin "$name" >&2
  BIN=$target/release/$name
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$work/pkg
install -d "$pkg/DEBIAN" "$pkg/usr/lib/systemd/system" "$pkg/usr/share/man/man1"
install -m 755 "$BIN" "$pkg/usr/bin/$name" -D

# The units as examples/systemd ships them (whatever units are there), with the binary in
# /usr/bin instead of /usr/local/bin.
for unit in examples/systemd/*.service examples/systemd/*.socket; do
  [[ -e $unit ]] || continue
  sed 's#/usr/local/bin/#/usr/bin/#g' "$unit" >"$pkg/usr/lib/systemd/system/$(basename "$unit")"
done
install -m 644 -D packaging/deb/user.conf "$pkg/usr/lib/systemd/system/$name.service.d/user.conf"
install -m 644 -D packaging/deb/sysusers.conf "$pkg/usr/lib/sysusers.d/$name.conf"
install -m 644 -D examples/systemd/$name.toml "$pkg/etc/$name.toml"

# Man pages and completions from the clap definitions of this very binary.
"$BIN" generate-assets --out-dir "$work/assets"
for page in "$work"/assets/man1/*.1; do
  gzip -9n <"$page" >"$pkg/usr/share/man/man1/$(basename "$page").gz"
done
install -m 644 -D "$work/assets/completions/$name.bash" "$pkg/usr/share/bash-completion/completions/$name"
install -m 644 -D "$work/assets/completions/_$name" "$pkg/usr/share/zsh/vendor-completions/_$name"
install -m 644 -D "$work/assets/completions/$name.fish" "$pkg/usr/share/fish/vendor_completions.d/$name.fish"
install -m 644 -D packaging/deb/copyright "$pkg/usr/share/doc/$name/copyright"
install -m 644 -D examples/systemd/README.md "$pkg/usr/share/doc/$name/README.systemd.md"
chmod -R u=rwX,go=rX "$pkg/usr" "$pkg/etc"
chmod 755 "$pkg/usr/bin/$name"

# The oldest glibc symbol version the binary needs is the libc6 it depends on.
glibc=$(objdump -T "$pkg/usr/bin/$name" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
install -m 755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$pkg/DEBIAN/"
echo "/etc/$name.toml" >"$pkg/DEBIAN/conffiles"
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: $name
Version: $deb_version
Architecture: $arch
Maintainer: consul-dns-forwarder maintainers <maintainers@consul-dns-forwarder.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: libc6 (>= $glibc), libgcc-s1
Recommends: systemd
Suggests: consul
Section: net
Priority: optional
Description: DNS forwarder answering *.consul from the local Consul agent
 A DNS server for every application host, next to its Consul agent: *.consul answered from
 Consul's HTTP health API (blocking queries, only healthy instances, the last known state kept
 while Consul is unreachable), every other name forwarded to the network's resolvers and
 cached. Replaces dnsmasq's server=/consul/127.0.0.1#8600.
CONTROL

mkdir -p "$out"
deb=$out/${name}_${deb_version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
echo "$deb"
