//! The helpdesk commands as an administrator meets them: the real binary
//! against a real store and a running server's admin endpoint. A bad
//! invocation gets one line that names the problem and a non-zero exit
//! (2 for what clap refuses, 1 for what the store refuses); a good one gets
//! one line saying what was done, and the store shows it done.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Output;

use common::usher::{Usher, UsherOpts};

const TOKEN: &str = "cli-test-token-0123456789";

/// A server with an admin endpoint, backend imap1 (nothing listens there:
/// no test here logs in) and dave@example.com on it, alias
/// d.smith@example.com.
fn usher() -> Usher {
    let usher = Usher::start(UsherOpts {
        extra: format!("[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
        ..UsherOpts::default()
    });
    let add = ["backend", "add", "imap1", "--host", "127.0.0.1"];
    assert_eq!(
        usher.ok(&[&add[..], &["--imap-port", "1"]].concat(), None),
        "added backend imap1\n"
    );
    let add = ["user", "add", "Dave@Example.com", "--backend", "imap1"];
    let out = usher.ok(&[&add[..], &["--password-stdin"]].concat(), Some(b"pw\n"));
    assert_eq!(out, "added dave@example.com on imap1\n");
    let out = usher.ok(
        &[
            "user",
            "alias-add",
            "D.Smith@example.com",
            "dave@example.com",
        ],
        None,
    );
    assert_eq!(
        out,
        "d.smith@example.com is now an alias of dave@example.com\n"
    );
    usher
}

/// `args` with `--admin` pointing at the running server (the config's
/// own address is port 0).
fn with_admin(usher: &Usher, args: &[&str]) -> Vec<String> {
    let admin = usher.addr("admin").to_string();
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if args[0] == "kick" {
        all.extend(["--admin".to_string(), admin]);
    }
    all
}

fn run(usher: &Usher, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let all = with_admin(usher, args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    usher.cli(&all, stdin)
}

/// usher's own error lines (log lines, if any, left out).
fn usher_errors(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("usher: "))
        .map(str::to_string)
        .collect()
}

fn show(usher: &Usher, login: &str) -> String {
    usher.ok(&["user", "show", login], None)
}

#[test]
fn bad_helpdesk_invocations_name_the_problem() {
    let usher = usher();
    // (command, stdin, the one error line after "usher: ")
    let refused: &[(&[&str], &[u8], &str)] = &[
        (
            &["kick", "--backend", "imap9"],
            b"",
            "no such backend: imap9",
        ),
        (
            &["kick", "--user", "Nobody@example.com"],
            b"",
            "no such user: nobody@example.com",
        ),
        (
            &["user", "alias-remove", "Dave@example.com"],
            b"",
            "dave@example.com is a user's login, not an alias \
             (`usher user remove dave@example.com` deletes the user)",
        ),
        (
            &["user", "alias-remove", "nobody@example.com"],
            b"",
            "no such alias: nobody@example.com",
        ),
        // The user is looked up before the password is read.
        (
            &["user", "passwd", "nobody@example.com", "--password-stdin"],
            b"",
            "no such user: nobody@example.com",
        ),
        (
            &["user", "passwd", "dave@example.com", "--password-stdin"],
            b"",
            "no password on stdin",
        ),
        (
            &["user", "passwd", "dave@example.com", "--password-stdin"],
            b"\n",
            "empty password",
        ),
        (
            &["user", "add", "erin@example.com", "--password-stdin"],
            b"",
            "no password on stdin",
        ),
        (&["hash", "--password-stdin"], b"", "no password on stdin"),
        (
            &["user", "add", "DAVE@example.com", "--password-stdin"],
            b"",
            "dave@example.com already exists",
        ),
        (
            &["user", "add", "erin@example.com", "--backend", "imap9"],
            b"pw\n",
            "no such backend: imap9",
        ),
        (
            &["user", "disable", "nobody@example.com"],
            b"",
            "no such user: nobody@example.com",
        ),
        (
            &["user", "remove", "nobody@example.com"],
            b"",
            "no such user: nobody@example.com",
        ),
        (
            &["user", "alias-add", "x@example.com", "nobody@example.com"],
            b"",
            "no such user: nobody@example.com",
        ),
        (
            &["backend", "set", "imap1"],
            b"",
            "name a setting to change, e.g. --weight 200 (see --help)",
        ),
        (
            &["backend", "set", "imap9", "--weight", "1"],
            b"",
            "no such backend: imap9",
        ),
        (
            &["user", "import"],
            b"k1@example.com a\nk2@example.com b\n\nK1@example.com c\n",
            "stdin line 4: k1@example.com is already on line 1",
        ),
        (
            &["user", "import"],
            b"k1@example.com a\ndave@example.com b\n",
            "stdin line 2: dave@example.com already exists",
        ),
        (
            &["user", "import"],
            b"k1@example.com a\nd.smith@example.com b\n",
            "stdin line 2: d.smith@example.com already exists as an alias of dave@example.com",
        ),
        (
            &["user", "import"],
            b"k1@example.com a\nk2@example.com\n",
            "stdin line 2: expected a login, a space and a password",
        ),
        (
            &["user", "import"],
            b"k1@example.com a\r\nnodomain pw\r\n",
            "stdin line 2: invalid value: login \"nodomain\": \
             use a full address such as alice@example.com",
        ),
        (
            &["user", "import", "--hashed"],
            b"k1@example.com {MD5}x\n",
            "stdin line 1: not a hash scheme usher can verify",
        ),
        (
            &["user", "import", "--backend", "imap9"],
            b"k1@example.com a\n",
            "no such backend: imap9",
        ),
    ];
    for (args, stdin, want) in refused {
        let out = run(&usher, args, Some(stdin));
        assert_eq!(out.status.code(), Some(1), "usher {args:?}: {out:?}");
        assert_eq!(
            usher_errors(&out),
            [format!("usher: {want}")],
            "usher {args:?}"
        );
        assert!(out.stdout.is_empty(), "usher {args:?}: {out:?}");
    }
    // The two kicks asked the server, which ended nothing.
    let kicks = || usher.log().matches("kick from the admin endpoint").count();
    assert_eq!(kicks(), 2, "{}", usher.log());
    // An import is all or none: nothing of the refused ones was added.
    let list = usher.ok(&["user", "list"], None);
    assert!(!list.contains("k1@"), "{list}");
    assert!(!list.contains("erin@"), "{list}");

    // What clap refuses, before any request: the value, the option and
    // what it takes.
    let usage: &[(&[&str], &[&str])] = &[
        (
            &["kick", "--client", "127.0.0.1:55266"],
            &["invalid value '127.0.0.1:55266' for '--client <CLIENT>': \
               not an IP address: give it without the port, e.g. 127.0.0.1"],
        ),
        (
            &["kick", "--client", "bogus"],
            &["invalid value 'bogus' for '--client <CLIENT>': not an IP address"],
        ),
        (
            &["backend", "set", "imap1", "--state", "bogus"],
            &[
                "invalid value 'bogus' for '--state <STATE>'",
                "[possible values: active, draining, disabled]",
            ],
        ),
        // Spelt as before: lower case only.
        (
            &["backend", "set", "imap1", "--state", "Active"],
            &["[possible values: active, draining, disabled]"],
        ),
        (
            &["backend", "set", "imap1", "--tls", "ssl"],
            &["[possible values: none, starttls, implicit]"],
        ),
        (
            &["backend", "set", "imap1", "--login", "plain"],
            &["[possible values: master, passthrough]"],
        ),
        (
            &["backend", "set", "imap1", "--forward", "xforward"],
            &["[possible values: none, id, xclient, proxy]"],
        ),
        (
            &["backend", "set", "imap1", "--imap-port", "0"],
            &["invalid value '0' for '--imap-port <IMAP_PORT>': 0 is not in 1..=65535"],
        ),
    ];
    for (args, want) in usage {
        let out = run(&usher, args, None);
        assert_eq!(out.status.code(), Some(2), "usher {args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in *want {
            assert!(stderr.contains(line), "usher {args:?}: {stderr}");
        }
    }
    // None of those reached the server.
    assert_eq!(kicks(), 2, "{}", usher.log());
    let list = usher.ok(&["backend", "list"], None);
    assert!(list.contains("Active"), "{list}");
}

#[test]
fn kicks_that_end_nothing_say_so() {
    let usher = usher();
    usher.ok(&["backend", "add", "idle", "--host", "127.0.0.1"], None);
    // (command, the one line on stdout); all exit 0.
    let cases: &[(&[&str], &str)] = &[
        (
            &["kick", "--user", "dave@example.com"],
            "no live session of user dave@example.com",
        ),
        (
            &["kick", "--user", "D.Smith@Example.com"],
            "no live session of user dave@example.com",
        ),
        (
            &["kick", "--backend", "idle"],
            "no live session on backend idle",
        ),
        (
            &["kick", "--client", "192.0.2.7"],
            "no live session from client 192.0.2.7",
        ),
        (
            &["kick", "--client", "2001:db8::7"],
            "no live session from client 2001:db8::7",
        ),
    ];
    for (args, want) in cases {
        let out = run(&usher, args, None);
        assert!(out.status.success(), "usher {args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want}\n"));
    }
    // Each did reach the server.
    let asked = usher.log().matches("kick from the admin endpoint").count();
    assert_eq!(asked, cases.len(), "{}", usher.log());
}

#[test]
fn an_admin_error_answer_is_shown_with_its_text() {
    let usher = usher();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let text = "the session registry is busy\n";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{text}",
            text.len()
        );
        (&stream).write_all(answer.as_bytes()).unwrap();
        String::from_utf8(body).unwrap()
    });
    let args = ["kick", "--user", "dave@example.com", "--admin", &addr];
    let out = usher.cli(&args, None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        usher_errors(&out),
        [format!(
            "usher: http://{addr}: the server answered 503 Service Unavailable: \
             the session registry is busy"
        )]
    );
    let asked: serde_json::Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(asked, serde_json::json!({"user": "dave@example.com"}));
}

#[test]
fn each_change_is_confirmed_in_one_line_and_made() {
    let usher = usher();
    usher.ok(
        &[
            "backend",
            "add",
            "imap2",
            "--host",
            "127.0.0.1",
            "--imap-port",
            "2",
        ],
        None,
    );
    // (command, stdin, stdout, what `user show dave@example.com` then says)
    let steps: &[(&[&str], &[u8], &str, &str)] = &[
        (
            &["user", "disable", "D.Smith@example.com"],
            b"",
            "disabled dave@example.com; live sessions end within a second",
            "enabled:  no",
        ),
        (
            &["user", "enable", "dave@example.com"],
            b"",
            "enabled dave@example.com",
            "enabled:  yes",
        ),
        (
            &["user", "assign", "dave@example.com", "imap2"],
            b"",
            "assigned dave@example.com to imap2; live sessions end within a second",
            "backend:  imap2",
        ),
        (
            &["user", "fallback", "dave@example.com", "imap1"],
            b"",
            "dave@example.com falls back to imap1 while imap2 is down",
            "fallback: imap1",
        ),
        (
            &["user", "fallback", "dave@example.com", "--none"],
            b"",
            "cleared the fallback of dave@example.com",
            "fallback: -",
        ),
        (
            &["user", "note", "dave@example.com", "VIP, call first"],
            b"",
            "set the note of dave@example.com",
            "note:     VIP, call first",
        ),
        (
            &["user", "note", "dave@example.com"],
            b"",
            "cleared the note of dave@example.com",
            "note:     \n",
        ),
        (
            &["user", "passwd", "DAVE@example.com", "--password-stdin"],
            b"new password\n",
            "password changed for dave@example.com; live sessions end within a second",
            "version:  ",
        ),
        (
            &[
                "user",
                "alias-add",
                "Dave.S@example.com",
                "d.smith@example.com",
            ],
            b"",
            "dave.s@example.com is now an alias of dave@example.com",
            "aliases:  d.smith@example.com, dave.s@example.com",
        ),
        (
            &["user", "alias-remove", "D.Smith@example.com"],
            b"",
            "removed alias d.smith@example.com of dave@example.com",
            "aliases:  dave.s@example.com\n",
        ),
        (
            &["user", "assign", "dave@example.com", "--none"],
            b"",
            "dave@example.com is unassigned and placed at the next login; \
             live sessions end within a second",
            "backend:  -",
        ),
    ];
    let mut version = 0;
    for (args, stdin, want, shown) in steps {
        let out = usher.ok(args, Some(stdin));
        assert_eq!(out, format!("{want}\n"), "usher {args:?}");
        let now = show(&usher, "dave@example.com");
        assert!(now.contains(shown), "after {args:?}:\n{now}");
        let v: i64 = now
            .lines()
            .find_map(|l| l.strip_prefix("version:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(v >= version, "after {args:?}:\n{now}");
        version = v;
    }

    let out = usher.ok(&["backend", "set", "imap2", "--weight", "200"], None);
    assert_eq!(out, "changed backend imap2\n");
    let list = usher.ok(&["backend", "list"], None);
    let imap2 = list.lines().find(|l| l.starts_with("imap2")).unwrap();
    assert!(imap2.contains(" 200 "), "{list}");
    for state in ["draining", "disabled", "active"] {
        let out = usher.ok(&["backend", "set", "imap2", "--state", state], None);
        assert_eq!(out, "changed backend imap2\n");
    }
    for (flag, value) in [
        ("--tls", "implicit"),
        ("--login", "passthrough"),
        ("--forward", "proxy"),
    ] {
        let out = usher.ok(&["backend", "set", "imap2", flag, value], None);
        assert_eq!(out, "changed backend imap2\n", "{flag} {value}");
    }
    let list = usher.ok(&["backend", "list"], None);
    let imap2 = list.lines().find(|l| l.starts_with("imap2")).unwrap();
    assert!(
        imap2.contains("implicit") && imap2.contains("passthrough"),
        "{list}"
    );

    let out = usher.ok(
        &["user", "add", "erin@example.com", "--password-stdin"],
        Some(b"pw\n"),
    );
    assert_eq!(
        out,
        "added erin@example.com; placed on a backend at the first login\n"
    );
    let out = usher.ok(
        &["user", "import", "--backend", "imap2"],
        Some(b"K1@example.com a\n\nk2@example.com b c\n"),
    );
    assert_eq!(out, "added 2 user(s)\n");
    assert!(show(&usher, "k1@example.com").contains("backend:  imap2"));

    let out = usher.ok(&["user", "remove", "k1@example.com"], None);
    assert_eq!(
        out,
        "removed k1@example.com (the mail stays on imap2); live sessions end within a second\n"
    );
    let out = usher.ok(&["user", "remove", "dave.s@example.com"], None);
    assert_eq!(
        out,
        "removed dave@example.com; live sessions end within a second\n"
    );
    let gone = usher.cli(&["user", "show", "dave@example.com"], None);
    assert_eq!(
        usher_errors(&gone),
        ["usher: no such user: dave@example.com"]
    );

    usher.ok(&["user", "remove", "k2@example.com"], None);
    let out = usher.ok(&["backend", "remove", "imap2"], None);
    assert_eq!(out, "removed backend imap2\n");
    assert!(!usher.ok(&["backend", "list"], None).contains("imap2"));
}
