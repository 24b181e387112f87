#!/bin/sh
# Installs what usher's demo, tests and benchmark need on a fresh Debian
# machine: Dovecot (IMAP, submission, LMTP), mbsync, swaks and its TLS
# modules, Python 3, openssl and curl. Packages already present are left
# alone. Rust itself (1.85 or newer, with rustfmt and clippy) must be there.
set -eu

packages="dovecot-core dovecot-imapd dovecot-submissiond dovecot-lmtpd isync \
swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl \
python3 openssl ca-certificates curl"

# Rust comes from rustup (Debian's rustc is older than usher's minimum);
# it cannot be installed from here, so say so plainly.
need_rust="1.85"
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install Rust $need_rust or newer with rustup," \
        "with the rustfmt and clippy components" >&2
    exit 1
fi

missing=""
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing:$missing" >&2
# shellcheck disable=SC2086
if ! $sudo apt-get install -y --no-install-recommends $missing; then
    $sudo apt-get update
    # shellcheck disable=SC2086
    $sudo apt-get install -y --no-install-recommends $missing
fi
# The packages may start the system-wide Dovecot on the standard ports; the
# demo and tests run private instances on other ports and need none of it.
# Stop that one instance only (by its own pid file), never anyone else's.
if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now dovecot >/dev/null 2>&1 || true
fi
if [ -s /run/dovecot/master.pid ]; then
    $sudo kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
fi
