#!/usr/bin/env python3
"""One submission session through usher, driven by Python's smtplib.

tests/real_clients.rs runs this script and checks what it reports. It
connects (STARTTLS on a 587-style port with SMTP.starttls, or TLS from the
first byte with SMTP_SSL), verifies usher's certificate against --ca, logs
in, sends one message with sendmail() and quits. Nothing is checked here
beyond what smtplib itself insists on: the script reports what happened as
one JSON object on stdout, and the Rust test decides whether that is right.

Arguments (all required unless marked):

    --host H --port P
    --tls starttls|implicit
    --ca FILE                CA certificate to verify usher against
    --auth login|plain|LOGIN login() (smtplib picks the mechanism from the
                             EHLO reply), or SMTP.auth() with the PLAIN or
                             LOGIN mechanism named
    --mail-from ADDR --rcpt-to ADDR
    --message FILE           the message, sent as bytes exactly as read
                             (smtplib adds only dot-stuffing and the end mark)
    --eight-bit              (optional) MAIL FROM with BODY=8BITMIME

Environment: USHER_USER and USHER_PASSWORD, so that the password appears
in no process list. smtplib encodes SASL responses as ASCII, so the
password must be ASCII.

The report: "ehlo_before_tls" (features of the cleartext EHLO, STARTTLS
only), "ehlo" (features inside TLS, lower-cased keys as smtplib keeps
them), "auth" ([code, text]), "refused" (sendmail's dict of refused
recipients), "quit" ([code, text]).
"""

import argparse
import json
import os
import smtplib
import ssl
import sys

# How long any one read may take before the script gives up.
TIMEOUT = 15


def connect(args, context):
    """Connects and says EHLO inside TLS; returns (smtp, features before TLS
    or None)."""
    if args.tls == "implicit":
        smtp = smtplib.SMTP_SSL(
            args.host, args.port, local_hostname="client.example.net",
            timeout=TIMEOUT, context=context,
        )
        smtp.ehlo()
        return smtp, None
    smtp = smtplib.SMTP(
        args.host, args.port, local_hostname="client.example.net", timeout=TIMEOUT
    )
    smtp.ehlo()
    before = dict(smtp.esmtp_features)
    smtp.starttls(context=context)
    smtp.ehlo()
    return smtp, before


def login(smtp, method, user, password):
    """Logs in; returns the reply as [code, text]."""
    if method == "login":
        code, text = smtp.login(user, password)
    else:
        smtp.user, smtp.password = user, password
        authobject = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[method]
        code, text = smtp.auth(method, authobject, initial_response_ok=True)
    return [code, text.decode("utf-8", "backslashreplace")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--tls", required=True, choices=["starttls", "implicit"])
    parser.add_argument("--ca", required=True)
    parser.add_argument("--auth", required=True, choices=["login", "PLAIN", "LOGIN"])
    parser.add_argument("--mail-from", required=True)
    parser.add_argument("--rcpt-to", required=True)
    parser.add_argument("--message", required=True)
    parser.add_argument("--eight-bit", action="store_true")
    args = parser.parse_args()
    with open(args.message, "rb") as f:
        message = f.read()

    context = ssl.create_default_context(cafile=args.ca)
    smtp, before = connect(args, context)
    report = {"ehlo_before_tls": before, "ehlo": dict(smtp.esmtp_features)}
    report["auth"] = login(
        smtp, args.auth, os.environ["USHER_USER"], os.environ["USHER_PASSWORD"]
    )
    options = ["BODY=8BITMIME"] if args.eight_bit else []
    # Bytes go out unchanged: sendmail() fixes line endings only in str.
    report["refused"] = smtp.sendmail(
        args.mail_from, [args.rcpt_to], message, mail_options=options
    )
    code, text = smtp.quit()
    report["quit"] = [code, text.decode("utf-8", "backslashreplace")]
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except (smtplib.SMTPException, OSError) as error:
        print(f"smtplib_session: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(2)
