#!/usr/bin/env python3
"""One mail-client session through usher, driven by Python's imaplib.

tests/real_clients.rs runs this script and checks what it reports. It
connects, logs in one of three ways, SELECTs INBOX, APPENDs a message,
FETCHes it back, then IDLEs while a second connection APPENDs another
message, and fetches that one too. Nothing is checked here beyond what
imaplib itself insists on: the script reports what happened as one JSON
object on stdout, and the Rust test decides whether that is right.

Arguments (all required):

    --host H --port P
    --tls none|starttls|implicit   how TLS is reached (STARTTLS with
                                   IMAP4.starttls, implicit with IMAP4_SSL)
    --ca FILE                      CA certificate to verify usher against
    --login literal|plain|quoted   LOGIN with the password as a synchronising
                                   literal, AUTHENTICATE PLAIN, or imaplib's
                                   own login() (a quoted string)
    --message FILE                 the message to APPEND and FETCH
    --idle-message FILE            the message the second connection APPENDs
                                   while the first one IDLEs

Environment: USHER_USER and USHER_PASSWORD (UTF-8), so that the password
appears in no process list.

The report has, among others:

    wire          the login exchange as sent and received, in order:
                  [["C" or "S", text], ...] (each send() call and each line
                  read is one entry; bytes that are not UTF-8 are escaped)
    fetched_b64   BODY[] of the appended message as FETCHed, base64
    idle          "continuation", the untagged lines seen while idling,
                  "exists" (the EXISTS line that ended the wait), "seconds"
                  (how long that wait took, from the end of the second
                  connection's APPEND), "done" (the tagged reply to DONE)
"""

import argparse
import base64
import imaplib
import json
import os
import re
import socket
import ssl
import sys
import time

# How long any one read may take before the script gives up.
READ_TIMEOUT = 15

# How long the IDLE wait for the new message's EXISTS may take. Dovecot
# announces a new message at once while it has an inotify instance for the
# mailbox, but falls back to checking every 30 seconds
# (mailbox_idle_check_interval) when the user its mail processes run as has
# used up fs.inotify.max_user_instances (128 by default, shared by every
# Dovecot on the machine running as that user, e.g. `nobody`).
IDLE_TIMEOUT = 45


class Recorder:
    """Keeps what an imaplib connection sends and reads while switched on."""

    def __init__(self):
        self.entries = []
        self.on = False

    def add(self, direction, data):
        if self.on:
            self.entries.append([direction, data.decode("utf-8", "backslashreplace")])


def recording(base):
    """An imaplib class whose send(), readline() and read() are recorded."""

    class Recorded(base):
        def __init__(self, *args, recorder, **kwargs):
            self.recorder = recorder
            super().__init__(*args, **kwargs)

        def send(self, data):
            self.recorder.add("C", data)
            super().send(data)

        def readline(self):
            line = super().readline()
            self.recorder.add("S", line)
            return line

        def read(self, size):
            data = super().read(size)
            self.recorder.add("S", data)
            return data

    return Recorded


def connect(args, recorder):
    """Connects with the requested TLS; returns (imap, greeting, caps before
    TLS or None, caps after)."""
    context = ssl.create_default_context(cafile=args.ca)
    if args.tls == "implicit":
        imap = recording(imaplib.IMAP4_SSL)(
            args.host, args.port, ssl_context=context, timeout=READ_TIMEOUT,
            recorder=recorder,
        )
        return imap, imap.welcome, None, list(imap.capabilities)
    imap = recording(imaplib.IMAP4)(
        args.host, args.port, timeout=READ_TIMEOUT, recorder=recorder
    )
    before = list(imap.capabilities)
    if args.tls == "starttls":
        typ, _ = imap.starttls(context)
        if typ != "OK":
            raise SystemExit(f"STARTTLS answered {typ}")
    return imap, imap.welcome, before, list(imap.capabilities)


def login(imap, method, user, password):
    """Logs in; returns the tagged reply's (type, text)."""
    if method == "quoted":
        # imaplib quotes the password itself ("...", with \" and \\) and
        # encodes command lines as ASCII unless UTF-8 was enabled: a
        # non-ASCII password raises here, before anything is sent.
        typ, data = imap.login(user, password)
    elif method == "plain":
        # AUTHENTICATE PLAIN without initial response: imaplib waits for
        # the "+" continuation, then sends base64(authzid NUL authcid NUL
        # password) with an empty authorization identity.
        response = b"\0" + user.encode() + b"\0" + password.encode()
        typ, data = imap.authenticate("PLAIN", lambda _challenge: response)
    elif method == "literal":
        # imaplib appends `{n}` for a pending literal, waits for "+", and
        # sends the octets and CRLF as two more writes; the user name goes
        # as an atom.
        imap.literal = password.encode()
        typ, data = imap._simple_command("LOGIN", user)
        if typ == "OK":
            imap.state = "AUTH"
    else:
        raise SystemExit(f"unknown login method {method}")
    return typ, b" ".join(data).decode("utf-8", "backslashreplace")


def response_code_number(imap, code, text):
    """The last number in `[CODE ...]` of a reply text, e.g. APPENDUID's UID."""
    match = re.search(r"\[" + code + r" ([0-9 ]+)\]", text)
    if match is None:
        raise SystemExit(f"no [{code}] in {text!r}")
    return match.group(1).split()[-1]


def append(imap, message):
    """APPENDs `message` to INBOX; returns its UID (from APPENDUID)."""
    typ, data = imap.append("INBOX", None, None, message)
    text = b" ".join(data).decode()
    if typ != "OK":
        raise SystemExit(f"APPEND answered {typ} {text}")
    return response_code_number(imap, "APPENDUID", text)


def fetch(imap, uid):
    """BODY[] of message `uid`, without setting \\Seen."""
    typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
    if typ != "OK":
        raise SystemExit(f"FETCH answered {typ} {data!r}")
    parts = [item for item in data if isinstance(item, tuple)]
    if len(parts) != 1:
        raise SystemExit(f"FETCH returned {data!r}")
    return parts[0][1]


def read_line(imap):
    """One server line as text, without CRLF."""
    line = imap.readline()
    if not line:
        raise SystemExit("connection closed while idling")
    return line.decode("utf-8", "backslashreplace").rstrip("\r\n")


def idle_until_exists(imap, args, idle_message):
    """IDLEs by hand (imaplib 3.11 has no idle()), lets a second connection
    APPEND `idle_message`, and reads until the EXISTS it causes."""
    tag = imap._new_tag().decode()
    imap.send(f"{tag} IDLE\r\n".encode())
    continuation = read_line(imap)
    report = {"continuation": continuation, "untagged": []}
    if not continuation.startswith("+"):
        report["error"] = "no continuation"
        return report, None

    # The second connection: same user, same way in.
    other, _, _, _ = connect(args, Recorder())
    typ, text = login(other, args.login, os.environ["USHER_USER"], os.environ["USHER_PASSWORD"])
    if typ != "OK":
        raise SystemExit(f"second login answered {typ} {text}")
    uid = append(other, idle_message)
    other.logout()

    started = time.monotonic()
    imap.sock.settimeout(IDLE_TIMEOUT)
    while True:
        line = read_line(imap)
        report["untagged"].append(line)
        if re.fullmatch(r"\* \d+ EXISTS", line):
            report["exists"] = line
            break
    report["seconds"] = round(time.monotonic() - started, 3)
    imap.sock.settimeout(READ_TIMEOUT)
    imap.send(b"DONE\r\n")
    while True:
        line = read_line(imap)
        if line.startswith(tag + " "):
            report["done"] = line
            break
        report["untagged"].append(line)
    return report, uid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--tls", required=True, choices=["none", "starttls", "implicit"])
    parser.add_argument("--ca", required=True)
    parser.add_argument("--login", required=True, choices=["literal", "plain", "quoted"])
    parser.add_argument("--message", required=True)
    parser.add_argument("--idle-message", required=True)
    args = parser.parse_args()
    user = os.environ["USHER_USER"]
    password = os.environ["USHER_PASSWORD"]
    with open(args.message, "rb") as f:
        message = f.read()
    with open(args.idle_message, "rb") as f:
        idle_message = f.read()

    recorder = Recorder()
    imap, greeting, caps_before_tls, caps = connect(args, recorder)
    report = {
        "greeting": greeting.decode("utf-8", "backslashreplace"),
        "capabilities_before_tls": caps_before_tls,
        "capabilities": caps,
    }

    # Log in, recording exactly what crosses the wire.
    recorder.on = True
    typ, text = login(imap, args.login, user, password)
    recorder.on = False
    report["wire"] = recorder.entries
    report["login"] = [typ, text]
    if typ != "OK":
        print(json.dumps(report))
        return

    typ, data = imap.select("INBOX")
    report["select"] = [typ, int(data[0])]

    uid = append(imap, message)
    report["appended_uid"] = uid
    report["fetched_b64"] = base64.b64encode(fetch(imap, uid)).decode()

    report["idle"], idle_uid = idle_until_exists(imap, args, idle_message)
    if idle_uid is not None:
        fetched = fetch(imap, idle_uid)
        report["idle_fetched_b64"] = base64.b64encode(fetched).decode()

    typ, data = imap.logout()
    report["logout"] = [typ, b" ".join(data).decode("utf-8", "backslashreplace")]
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except (imaplib.IMAP4.error, OSError, socket.timeout) as error:
        print(f"imaplib_session: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(2)
