#!/bin/sh
# usher's demo on one machine: two private Dovecot backends (IMAP and
# submission) on free loopback ports, a sink that keeps the mail they relay,
# a fresh SQLite store with demo users on each backend, and usher in front
# of them with the example certificate. Ctrl-C (or SIGTERM) stops it all.
#
# Everything lives in one directory: $USHER_DEMO_DIR if set, else a new one
# under /tmp, printed at start. Nothing is read from /etc/dovecot.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/install-deps.sh"

# Step: build usher.
echo "building usher (release)..." >&2
(cd "$top" && cargo build --release --quiet --bin usher)
usher="$top/target/release/usher"
certs="$top/certs-example"

dir=${USHER_DEMO_DIR:-$(mktemp -d /tmp/usher-demo.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# Dovecot's unprivileged processes must reach their files in here.
chmod 755 "$dir"

pids=""
cleanup() {
    trap - EXIT INT TERM
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $pids; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints N free loopback TCP ports, one a line.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Step: the sink. Dovecot's submission service relays every accepted
# message here; each one is kept as $dir/sink/N.eml.
mkdir -p "$dir/sink"
sink_port=$(free_ports 1)
python3 - "$sink_port" "$dir/sink" <<'PY' >"$dir/sink.log" 2>&1 &
import os, socketserver, sys

port, folder = int(sys.argv[1]), sys.argv[2]

class Relay(socketserver.StreamRequestHandler):
    def say(self, line):
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self):
        self.say("220 demo-sink ESMTP")
        for raw in self.rfile:
            verb = raw[:4].upper()
            if verb in (b"EHLO", b"HELO", b"LHLO"):
                self.say("250-demo-sink")
                self.say("250-8BITMIME")
                self.say("250 PIPELINING")
            elif verb == b"DATA":
                self.say("354 end with <CRLF>.<CRLF>")
                body = []
                for line in self.rfile:
                    if line == b".\r\n":
                        break
                    body.append(line[1:] if line.startswith(b"..") else line)
                n = len(os.listdir(folder)) + 1
                with open(os.path.join(folder, "%d.eml" % n), "wb") as f:
                    f.write(b"".join(body))
                self.say("250 kept as %d.eml" % n)
            elif verb == b"QUIT":
                self.say("221 bye")
                return
            else:
                self.say("250 ok")

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", port), Relay).serve_forever()
PY
pids="$pids $!"

# Step: two Dovecot backends. usher logs in to them as the master user, so
# they need no user list of their own: any login name gets a Maildir.
if [ "$(id -u)" -eq 0 ]; then
    mail_ids="uid=65534 gid=65534"
    identity=""
else
    me=$(id -un)
    mail_ids="uid=$(id -u) gid=$(id -g)"
    identity="default_internal_user = $me
default_internal_group = $(id -gn)
default_login_user = $me
first_valid_uid = $(id -u)
service anvil {
  chroot =
}
service imap-login {
  chroot =
}
service submission-login {
  chroot =
}"
fi
master_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

start_dovecot() {
    name=$1 imap_port=$2 submission_port=$3
    d="$dir/$name"
    mkdir -p "$d/run" "$d/state" "$d/mail"
    chmod 755 "$d"
    [ "$(id -u)" -eq 0 ] && chown 65534:65534 "$d/mail"
    printf 'master:%s\n' "$(doveadm pw -s SHA512-CRYPT -p "$master_password")" \
        >"$d/passwd.master"
    : >"$d/passwd.users"
    chmod 644 "$d/passwd.master" "$d/passwd.users"
    cat >"$d/dovecot.conf" <<EOF
# Written by scripts/demo.sh for backend $name.
instance_name = usher-demo-$name
base_dir = $d/run
state_dir = $d/state
log_path = $d/dovecot.log
protocols = imap submission
listen = 127.0.0.1
hostname = $name.localhost
login_greeting = Dovecot ($name) ready.
# usher on loopback forwards the client's address (IMAP ID, XCLIENT).
login_trusted_networks = 127.0.0.0/8 ::1/128
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
# Any octets in login names (josé@example.com); usher has checked them.
auth_username_chars =
auth_username_format = %Lu
$identity
passdb {
  driver = passwd-file
  args = $d/passwd.master
  master = yes
}
# Only the master user logs in here: this list of users stays empty.
passdb {
  driver = passwd-file
  args = $d/passwd.users
}
userdb {
  driver = static
  args = $mail_ids home=$d/mail/%Lu allow_all_users=yes
}
mail_location = maildir:~/Maildir
service imap-login {
  inet_listener imap {
    port = $imap_port
  }
  inet_listener imaps {
    port = 0
  }
}
submission_relay_host = 127.0.0.1
submission_relay_port = $sink_port
submission_relay_trusted = no
submission_relay_ssl = no
service submission-login {
  inet_listener submission {
    port = $submission_port
  }
}
EOF
    dovecot -F -c "$d/dovecot.conf" 2>"$d/dovecot.stderr" &
    pids="$pids $!"
}

set -- $(free_ports 5)
admin_port=$5
start_dovecot imap1 "$1" "$2"
imap1_imap=$1 imap1_submission=$2
start_dovecot imap2 "$3" "$4"
imap2_imap=$3 imap2_submission=$4

# Step: usher's configuration and store.
cat >"$dir/usher.toml" <<EOF
# Written by scripts/demo.sh. See usher.example.toml for every key.
hostname = "usher.localhost"

[store]
url = "sqlite://$dir/usher.db"

[tls]
# The published EXAMPLE certificate for localhost: demo use only.
cert = "$certs/localhost.crt"
key = "$certs/localhost.key"

[[listener]]
name = "imap"
protocol = "imap"
address = "127.0.0.1:0"
tls = "starttls"

[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"

[[listener]]
name = "submission"
protocol = "submission"
address = "127.0.0.1:0"
tls = "starttls"

[[listener]]
name = "submissions"
protocol = "submission"
address = "127.0.0.1:0"
tls = "implicit"

[auth]
failure_delay = "1s"

[backends]
master_user = "master"
master_password_file = "$dir/master-password"

[health]
interval = "2s"

[admin]
# A fixed port, so that "usher sessions" and "usher kick" find it.
address = "127.0.0.1:$admin_port"
token = "$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
EOF
chmod 600 "$dir/usher.toml"
(umask 077 && printf '%s\n' "$master_password" >"$dir/master-password")
export USHER_CONFIG="$dir/usher.toml"

"$usher" check-config >/dev/null
"$usher" backend add imap1 --host 127.0.0.1 --imap-port "$imap1_imap" \
    --submission-port "$imap1_submission" --forward xclient >/dev/null
"$usher" backend add imap2 --host 127.0.0.1 --imap-port "$imap2_imap" \
    --submission-port "$imap2_submission" --forward xclient >/dev/null
printf 'alice-demo-password\n' |
    "$usher" user add alice@example.com --backend imap1 --password-stdin >/dev/null
printf 'bob-demo-password\n' |
    "$usher" user add bob@example.com --backend imap2 --password-stdin >/dev/null
# carol has no backend: usher places her at her first login.
printf 'carol-demo-password\n' |
    "$usher" user add carol@example.com --password-stdin >/dev/null
"$usher" user alias-add alice.smith@example.com alice@example.com >/dev/null

# Step: usher itself.
RUST_LOG=${RUST_LOG:-usher=info} "$usher" serve --ready-file "$dir/ready.json" \
    2>"$dir/usher.log" &
usher_pid=$!
pids="$usher_pid $pids"
tries=0
until [ -s "$dir/ready.json" ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$usher_pid" 2>/dev/null; then
        echo "usher did not start; its log:" >&2
        cat "$dir/usher.log" >&2
        exit 1
    fi
    sleep 0.1
done
addr() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
        "$dir/ready.json" "$1"
}
imap=$(addr imap) imaps=$(addr imaps)
submission=$(addr submission) submissions=$(addr submissions)

cat <<EOF

usher is running in front of two Dovecot backends (all in $dir).

  IMAP, STARTTLS     $imap
  IMAP, TLS          $imaps
  submission, STARTTLS  $submission
  submission, TLS    $submissions
  CA certificate     $certs/ca.crt   (the server certificate is for "localhost")

  users              alice@example.com / alice-demo-password   on imap1
                     (alias alice.smith@example.com)
                     bob@example.com   / bob-demo-password     on imap2
                     carol@example.com / carol-demo-password   placed at first login

Read a mailbox:
  curl --cacert $certs/ca.crt --user 'alice@example.com:alice-demo-password' \\
      'imaps://localhost:${imaps##*:}/INBOX?ALL'

Send a message (the backend relays it to $dir/sink/):
  swaks --server localhost:${submission##*:} -tls --tls-verify --tls-ca-path $certs/ca.crt \\
      --auth PLAIN --auth-user alice@example.com --auth-password alice-demo-password \\
      --from alice@example.com --to bob@example.com

Helpdesk, against the same store (the running server follows at once):
  export USHER_CONFIG=$dir/usher.toml
  $usher user list
  $usher user move alice@example.com imap2
  $usher sessions

usher's log: $dir/usher.log      Ctrl-C stops everything.
EOF
wait "$usher_pid"
