//! Runs the real `usher` binary for a test: a config in a temporary
//! directory, a fresh SQLite store, listeners on free loopback ports.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::dovecot::{example_certs_dir, Dovecot, MASTER_PASSWORD, MASTER_USER};

/// What a test wants from its usher.
#[derive(Clone)]
pub struct UsherOpts {
    /// Allow passwords on the cleartext IMAP and submission listeners
    /// ("imap", "submission"; the "-strict" ones never allow them).
    pub plaintext_auth: bool,
    /// `auth.failure_delay`.
    pub failure_delay: &'static str,
    /// `limits.prelogin_timeout`.
    pub prelogin_timeout: &'static str,
    /// `limits.backend_timeout`.
    pub backend_timeout: &'static str,
    /// Extra TOML appended to the generated file (sections of its own).
    pub extra: String,
    /// Extra `[limits]` lines.
    pub limits: String,
    /// Extra `[auth]` lines.
    pub auth: String,
    /// `RUST_LOG` for the server: everything by default; the benchmark
    /// runs at the production level.
    pub log_filter: &'static str,
}

impl Default for UsherOpts {
    fn default() -> Self {
        UsherOpts {
            plaintext_auth: true,
            failure_delay: "200ms",
            prelogin_timeout: "20s",
            backend_timeout: "5s",
            extra: String::new(),
            limits: String::new(),
            auth: String::new(),
            log_filter: "usher=debug,info",
        }
    }
}

/// A running usher process; stopped on drop.
pub struct Usher {
    child: Option<Child>,
    dir: TempDir,
    config: PathBuf,
    addrs: HashMap<String, SocketAddr>,
    log_filter: &'static str,
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_usher")
}

/// Writes a config for `opts` into `dir`; listeners on port 0.
pub fn write_config(dir: &Path, opts: &UsherOpts) -> PathBuf {
    let certs = example_certs_dir();
    let text = format!(
        r#"hostname = "usher.test"

[store]
url = "sqlite://{dir}/usher.db"

[tls]
cert = "{certs}/localhost.crt"
key = "{certs}/localhost.key"

[[listener]]
name = "imap"
protocol = "imap"
address = "127.0.0.1:0"
tls = "starttls"
plaintext_auth = {plain}

[[listener]]
name = "imaps"
protocol = "imap"
address = "127.0.0.1:0"
tls = "implicit"

[[listener]]
name = "imap-strict"
protocol = "imap"
address = "127.0.0.1:0"
tls = "starttls"

[[listener]]
name = "submission"
protocol = "submission"
address = "127.0.0.1:0"
tls = "starttls"
plaintext_auth = {plain}

[[listener]]
name = "submissions"
protocol = "submission"
address = "127.0.0.1:0"
tls = "implicit"

[[listener]]
name = "submission-strict"
protocol = "submission"
address = "127.0.0.1:0"
tls = "starttls"

[limits]
prelogin_timeout = "{prelogin}"
backend_timeout = "{backend}"
{limits}

[auth]
argon2_memory_kib = 256
argon2_iterations = 1
failure_delay = "{delay}"
{auth}

[backends]
master_user = "{master}"
master_password = "{master_pw}"
ca = "{certs}/ca.crt"

{extra}
"#,
        dir = dir.display(),
        certs = certs.display(),
        plain = opts.plaintext_auth,
        prelogin = opts.prelogin_timeout,
        backend = opts.backend_timeout,
        limits = opts.limits,
        delay = opts.failure_delay,
        auth = opts.auth,
        master = MASTER_USER,
        master_pw = MASTER_PASSWORD,
        extra = opts.extra,
    );
    let path = dir.join("usher.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Usher {
    /// Starts usher and waits until every listener is bound.
    pub fn start(opts: UsherOpts) -> Usher {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &opts);
        let mut usher = Usher {
            child: None,
            dir,
            config,
            addrs: HashMap::new(),
            log_filter: opts.log_filter,
        };
        usher.spawn();
        usher
    }

    fn spawn(&mut self) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut command = Command::new(binary());
        command
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // An aborted test or benchmark must not leave usher behind: it
        // gets SIGTERM when the thread that started it ends.
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().expect("starting usher");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(map) = serde_json::from_str::<HashMap<String, String>>(&text) {
                    self.addrs = map
                        .into_iter()
                        .map(|(k, v)| (k, v.parse().unwrap()))
                        .collect();
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("usher exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "usher did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("usher.log")
    }

    /// Everything usher logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Address of the listener named `name`: imap, imaps, imap-strict,
    /// submission, submissions, submission-strict.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs an `usher` CLI command against this usher's store.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or(b"")).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "usher {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers a Dovecot instance as backend `name` (master-user login).
    pub fn add_backend(&self, name: &str, dovecot: &Dovecot) {
        let port = dovecot.imap_port().to_string();
        self.ok(
            &[
                "backend",
                "add",
                name,
                "--host",
                "127.0.0.1",
                "--imap-port",
                &port,
            ],
            None,
        );
    }

    /// Registers a submission backend on 127.0.0.1:`port` (master-user
    /// login unless `flags` say otherwise, e.g. `["--forward", "xclient"]`,
    /// `["--tls", "starttls"]`, `["--login", "passthrough"]`).
    pub fn add_submission_backend(&self, name: &str, port: u16, flags: &[&str]) {
        let port = port.to_string();
        let mut args = vec![
            "backend",
            "add",
            name,
            "--host",
            "127.0.0.1",
            "--submission-port",
            &port,
        ];
        args.extend_from_slice(flags);
        self.ok(&args, None);
    }

    /// Adds a user with `password` and no assigned backend: submission
    /// places such a user in the pool.
    pub fn add_pool_user(&self, login: &str, password: &[u8]) {
        let mut input = password.to_vec();
        input.push(b'\n');
        self.ok(&["user", "add", login, "--password-stdin"], Some(&input));
    }

    /// Adds a user with `password` on `backend`.
    pub fn add_user(&self, login: &str, password: &[u8], backend: &str) {
        let mut input = password.to_vec();
        input.push(b'\n');
        self.ok(
            &[
                "user",
                "add",
                login,
                "--backend",
                backend,
                "--password-stdin",
            ],
            Some(&input),
        );
    }

    /// Sends SIGTERM and waits for the process.
    /// The server's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Stops the server and starts it again on the same store; listeners
    /// get new ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM through the `kill` command, to keep tests free of libc.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for Usher {
    fn drop(&mut self) {
        self.stop();
    }
}
