#!/bin/sh
# Installs what usher's demo, tests and benchmark need on a fresh Debian
# machine: Dovecot (IMAP, submission, LMTP), mbsync, swaks and its TLS
# modules, Python 3 and openssl. Packages already present are left alone.
set -eu

packages="dovecot-core dovecot-imapd dovecot-submissiond dovecot-lmtpd isync \
swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl \
python3 openssl ca-certificates"

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
# The packages start a system-wide Dovecot on the standard ports; the demo and
# tests run their own instances, so stop it and keep it stopped.
if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now dovecot >/dev/null 2>&1 || true
fi
$sudo pkill -x dovecot 2>/dev/null || true
