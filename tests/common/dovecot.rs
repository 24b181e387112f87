//! Real Dovecot backends for integration tests.
//!
//! [`Dovecot::start`] runs a private Dovecot 2.3 instance as a child process.
//! Its configuration, sockets, state, log and mail all live in one temporary
//! directory, nothing is read from `/etc/dovecot`, and it listens only on
//! 127.0.0.1, on ports the kernel chose.
//!
//! The directory ([`Dovecot::dir`]) holds:
//!
//! ```text
//! dovecot.conf          the whole configuration
//! dovecot.log           everything Dovecot logs (Dovecot::log)
//! dovecot.stderr        what the master printed before its log was open
//! passwd.master         the master user
//! passwd.users          users added with Dovecot::add_user (SHA512-CRYPT)
//! run/                  base_dir: sockets and master.pid
//! state/                state_dir
//! mail/<user>/Maildir   one Maildir per user, made at the first login
//! ```
//!
//! Who can log in:
//! - any user name, through the master user: SASL PLAIN with the user as
//!   authorization identity and [`MASTER_USER`] / [`MASTER_PASSWORD`] as
//!   authentication identity and password, or Dovecot's own form
//!   `LOGIN user*master masterpw`;
//! - a user added with [`Dovecot::add_user`], with their own password.
//!
//! Dovecot lower-cases login names (`auth_username_format = %Lu`), so mail of
//! `Alice@Example.com` lands in the Maildir of `alice@example.com`. Any
//! octets may appear in a login name (`auth_username_chars` is empty), so
//! UTF-8 names such as `josé@example.com` log in too.
//!
//! Submission (with [`DovecotOpts::submission`]) relays every message to
//! the given port as plain SMTP; Dovecot adds one `Received:` header at the
//! top and uses BDAT towards the relay when it offers CHUNKING. Before
//! login its EHLO lists 8BITMIME, AUTH PLAIN LOGIN, BURL imap, CHUNKING,
//! ENHANCEDSTATUSCODES, SIZE (no value), STARTTLS (with `tls`), PIPELINING
//! and, to loopback (a trusted network), XCLIENT; never SMTPUTF8 (Dovecot
//! 2.3 answers `555 5.5.4 Unsupported parameters` to `MAIL … SMTPUTF8`).
//! After XCLIENT it still wants AUTH.
//!
//! When the tests run as root, mail processes run as `nobody` (65534:65534)
//! and login and auth processes as the `dovenull` and `dovecot` users of the
//! Debian package; the temporary directory is world-readable so that they
//! can reach it. As any other user, every process stays that user.
//!
//! The master runs in the foreground (`dovecot -F`) under a small shell that
//! holds a pipe from the test process: closing the pipe, or the test process
//! dying for any reason, sends Dovecot SIGTERM, so an aborted test run leaves
//! no Dovecot behind.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use super::net;

/// The master user that may log in as anyone.
pub const MASTER_USER: &str = "master";

/// The master user's password.
pub const MASTER_PASSWORD: &str = "masterpw";

/// Dovecot's master binary, as the Debian package installs it.
const DOVECOT_BIN: &str = "/usr/sbin/dovecot";

/// Dovecot's admin tool, used to hash passwords.
const DOVEADM_BIN: &str = "/usr/bin/doveadm";

/// How long a start may take before the test gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stop may take before Dovecot is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a start is retried when another process took one of the ports.
const START_ATTEMPTS: usize = 5;

/// uid and gid of `nobody`, whom mail processes run as when tests run as root.
const NOBODY: (u32, u32) = (65534, 65534);

/// Runs Dovecot in the foreground and stops it when stdin closes.
///
/// `$1` is the dovecot binary and `$2` its configuration. A background
/// watcher reads the pipe (kept as fd 3, since background jobs get
/// /dev/null as stdin) and sends SIGTERM on end of file. The shell exits
/// with Dovecot's status once Dovecot is gone, with all its children.
const SUPERVISOR: &str = r#"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec 3<&0 </dev/null
"$1" -F -c "$2" 3<&- &
dovecot=$!
(read -r line <&3; kill -TERM "$dovecot" 2>/dev/null) &
watcher=$!
exec 3<&-
wait "$dovecot" 2>/dev/null
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// What a test wants from its Dovecot besides plain IMAP.
#[derive(Debug, Clone, Default)]
pub struct DovecotOpts {
    /// Serve submission too, relaying every accepted message to
    /// 127.0.0.1 on this port (plain SMTP, no TLS, no AUTH toward it).
    pub submission: Option<u16>,
    /// Switch TLS on with `certs-example/localhost.crt`: STARTTLS on the
    /// plain ports, plus an IMAPS port (and SUBMISSIONS with submission).
    pub tls: bool,
}

/// What a benchmark asks of an instance beyond [`DovecotOpts`], kept in a
/// struct of its own so that `DovecotOpts { .. }` literals elsewhere stay
/// valid. The default changes nothing.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Size the login, imap and submission services for this many
    /// concurrent sessions (0: the sizes above, about 2,000).
    pub clients: usize,
    /// Act as a proxy in front of other Dovecots: users log in with the
    /// entries of [`Dovecot::set_proxy_users`], one file per service, and
    /// are relayed to the backend each entry names.
    pub proxy: bool,
    /// The imap and submission listeners expect a PROXY protocol header
    /// (v1 or v2) from loopback before anything else (`haproxy = yes`).
    pub haproxy: bool,
}

/// One user of a proxy instance: the password hash checked at the proxy
/// and the backend the session is relayed to, where the proxy logs in as
/// [`MASTER_USER`] with the user as authorization identity (SASL PLAIN),
/// the way usher logs in to its backends.
#[derive(Debug, Clone)]
pub struct ProxyUser {
    pub user: String,
    pub hash: String,
    pub backend_port: u16,
}

/// A running (or stopped) private Dovecot instance; dropping it stops it.
pub struct Dovecot {
    dir: TempDir,
    layout: Layout,
    opts: DovecotOpts,
    tuning: Tuning,
    ports: Ports,
    run_as: RunAs,
    child: Option<Child>,
}

/// The ports one instance listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    imap: u16,
    imaps: Option<u16>,
    submission: Option<u16>,
    submissions: Option<u16>,
}

/// Paths inside the instance's directory.
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
}

/// Whom Dovecot's processes run as.
#[derive(Debug, Clone)]
enum RunAs {
    /// The tests run as root: mail processes switch to `nobody`.
    Root,
    /// The tests run as an ordinary user, and so does every process.
    User {
        name: String,
        group: String,
        uid: u32,
        gid: u32,
    },
}

/// Why a launch did not come up.
#[derive(Debug)]
enum LaunchError {
    /// Dovecot exited before it served its greeting.
    Exited(ExitStatus),
    /// No greeting within [`READY_TIMEOUT`].
    TimedOut,
}

impl Dovecot {
    /// Starts a new instance and returns once its IMAP port greets.
    ///
    /// Panics with a pointer to `scripts/test.sh` when Dovecot is not
    /// installed, and with Dovecot's log when it does not come up within
    /// ten seconds.
    pub fn start(opts: DovecotOpts) -> Dovecot {
        Dovecot::start_tuned(opts, Tuning::default())
    }

    /// [`Dovecot::start`] with the sizes and the proxy role of `tuning`.
    pub fn start_tuned(opts: DovecotOpts, tuning: Tuning) -> Dovecot {
        require_installed(DOVECOT_BIN);
        let dir = tempfile::Builder::new()
            .prefix("usher-dovecot-")
            .tempdir()
            .expect("create temporary directory for dovecot");
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        let run_as = RunAs::current(&layout.root);
        prepare_dir(&layout, &run_as);
        let mut dovecot = Dovecot {
            dir,
            layout,
            ports: Ports::pick(&opts),
            opts,
            tuning,
            run_as,
            child: None,
        };
        dovecot.launch_first();
        dovecot
    }

    /// The IMAP port (cleartext, STARTTLS when `tls` is on).
    pub fn imap_port(&self) -> u16 {
        self.ports.imap
    }

    /// The IMAPS port (TLS from the first byte), when `tls` is on.
    pub fn imaps_port(&self) -> Option<u16> {
        self.ports.imaps
    }

    /// The submission port, when `submission` is set.
    pub fn submission_port(&self) -> Option<u16> {
        self.ports.submission
    }

    /// The SUBMISSIONS port (TLS from the first byte), when both
    /// `submission` and `tls` are set.
    pub fn submissions_port(&self) -> Option<u16> {
        self.ports.submissions
    }

    /// The instance's temporary directory (see the module docs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the instance is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the instance; returns once its ports are closed.
    ///
    /// Stopping a stopped instance does nothing.
    pub fn stop(&mut self) {
        if let Err(problem) = self.shutdown() {
            panic!("{problem}\n{}", self.diagnostics());
        }
    }

    /// Stops the instance if it runs, then starts it again on the same
    /// ports with the same users and mail.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(error) = self.launch() {
            panic!(
                "dovecot did not come back on port {}: {error:?}\n{}",
                self.ports.imap,
                self.diagnostics()
            );
        }
    }

    /// Lets `user` log in directly with `password` (replacing an earlier
    /// password). See [`Dovecot::add_users`].
    pub fn add_user(&self, user: &str, password: &str) {
        self.add_users(&[(user, password)]);
    }

    /// Lets each `(user, password)` log in directly with that password.
    ///
    /// Passwords are stored as `{SHA512-CRYPT}` hashes made by `doveadm pw`,
    /// so any UTF-8 (quotes, backslashes, spaces, non-ASCII) round-trips.
    /// Dovecot looks at the file at most once per second, so this returns
    /// only after the next whole second has begun (about half a second on
    /// average): add many users in one call.
    pub fn add_users(&self, users: &[(&str, &str)]) {
        let path = self.layout.users_passwd();
        let mut entries = read_passwd(&path);
        for (user, password) in users {
            let name = passwd_name(user);
            let hash = hash_password("SHA512-CRYPT", password);
            entries.retain(|(existing, _)| *existing != name);
            entries.push((name, hash));
        }
        write_passwd(&path, &entries);
        sleep_into_next_second();
    }

    /// Lets each `(user, hash)` log in directly, `hash` being a stored
    /// hash such as `{SSHA512}…` (see [`hash_password`]); for many users
    /// sharing one hash, without a `doveadm` run per user.
    pub fn add_hashed_users(&self, users: &[(&str, &str)]) {
        let path = self.layout.users_passwd();
        let mut entries = read_passwd(&path);
        for (user, hash) in users {
            let name = passwd_name(user);
            entries.retain(|(existing, _)| *existing != name);
            entries.push((name, hash.to_string()));
        }
        write_passwd(&path, &entries);
        sleep_into_next_second();
    }

    /// Replaces the users of a proxy instance ([`Tuning::proxy`]) for
    /// `service` (`imap` or `submission`): each is checked against its
    /// hash here and relayed to 127.0.0.1 on its backend port.
    pub fn set_proxy_users(&self, service: &str, users: &[ProxyUser]) {
        let entries: Vec<(String, String)> = users
            .iter()
            .map(|u| {
                // passwd-file: user:password:uid:gid:gecos:home:shell:extra.
                let extra = format!(
                    "proxy=y host=127.0.0.1 port={} master={MASTER_USER} pass={MASTER_PASSWORD}",
                    u.backend_port
                );
                (passwd_name(&u.user), format!("{}::::::{extra}", u.hash))
            })
            .collect();
        write_passwd(&self.layout.proxy_passwd(service), &entries);
        sleep_into_next_second();
    }

    /// The pid of the master process, whose tree is the whole instance.
    pub fn pid(&self) -> Option<u32> {
        self.master_pid()?.parse().ok()
    }

    /// The Maildir of `user` (which exists once the user has logged in).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.layout.maildir(user)
    }

    /// All message files of `user`'s INBOX (in `new/` and `cur/`), sorted.
    pub fn message_files(&self, user: &str) -> Vec<PathBuf> {
        let maildir = self.maildir(user);
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .flat_map(|sub| files_in(&maildir.join(sub)))
            .collect();
        files.sort();
        files
    }

    /// Puts `message` into `user`'s INBOX directly, as a delivery would,
    /// and returns its file. Dovecot sees it at the next mailbox sync.
    pub fn put_message(&self, user: &str, message: &[u8]) -> PathBuf {
        let maildir = self.maildir(user);
        for sub in ["", "new", "cur", "tmp"] {
            create_owned_dirs(&self.layout.mail_root(), &maildir.join(sub), &self.run_as);
        }
        let name = unique_maildir_name();
        let tmp = maildir.join("tmp").join(&name);
        fs::write(&tmp, message).expect("write message into Maildir/tmp");
        self.run_as.give_away(&tmp);
        let new = maildir.join("new").join(&name);
        fs::rename(&tmp, &new).expect("move message into Maildir/new");
        new
    }

    /// Everything Dovecot has logged so far.
    ///
    /// Logins show as `imap-login: Info: Login: user=<alice@example.com>,
    /// method=PLAIN, rip=…`, master logins also as `auth: Info: Master user
    /// logging in as alice@example.com`, saved messages as `save: box=…`.
    pub fn log(&self) -> String {
        read_lossy(&self.layout.log())
    }

    /// Waits until the log contains `needle`; false after `timeout`.
    ///
    /// Dovecot writes its log through a separate process, so a line can
    /// appear a moment after the client saw the reply it belongs to.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        net::poll_until(timeout, || self.log().contains(needle))
    }

    /// The first start: picks new ports while another process holds one.
    fn launch_first(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            match self.launch() {
                Ok(()) => return,
                Err(LaunchError::Exited(_)) if attempt < START_ATTEMPTS && self.lost_a_port() => {
                    self.ports = Ports::pick(&self.opts);
                }
                Err(error) => self.fail_start(error),
            }
        }
    }

    /// Writes the configuration for the current ports, spawns Dovecot and
    /// waits for its greeting.
    fn launch(&mut self) -> Result<(), LaunchError> {
        let config = render_config(
            &self.layout,
            &self.ports,
            (&self.opts, &self.tuning),
            &self.run_as,
        );
        fs::write(self.layout.config(), config).expect("write dovecot.conf");
        let mut child = self.spawn();
        let result = wait_ready(
            &mut child,
            self.ports.imap,
            &self.layout.greeting(),
            self.tuning.haproxy,
        );
        self.child = Some(child);
        if result.is_err() {
            // Reap the supervisor (and a half-started Dovecot) before a
            // retry; a port may belong to someone else, so do not wait for
            // it to close.
            let _ = self.reap();
        }
        result
    }

    /// Spawns the supervisor shell running Dovecot.
    fn spawn(&self) -> Child {
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(self.layout.stderr())
            .expect("open dovecot.stderr");
        Command::new("/bin/sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("usher-dovecot")
            .arg(DOVECOT_BIN)
            .arg(self.layout.config())
            .current_dir(&self.layout.root)
            .stdin(Stdio::piped())
            .stdout(stderr.try_clone().expect("clone dovecot.stderr"))
            .stderr(stderr)
            .spawn()
            .expect("spawn /bin/sh to run dovecot")
    }

    /// Stops Dovecot and checks that its ports closed, without panicking
    /// (for `Drop`); says what went wrong.
    fn shutdown(&mut self) -> Result<(), String> {
        if self.child.is_none() {
            return Ok(());
        }
        self.reap()?;
        self.wait_ports_closed()
    }

    /// Stops Dovecot and waits for the supervisor to exit.
    fn reap(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // End of file on the supervisor's stdin makes it send SIGTERM.
        drop(child.stdin.take());
        self.skip_final_pause(&mut child);
        let stopped = wait_for_exit(&mut child, STOP_TIMEOUT).is_some();
        if !stopped {
            self.kill_master();
            let _ = child.kill();
            let _ = child.wait();
        }
        // A mail process the master did not take down (seen with IDLE
        // sessions) would keep its client connected to a "stopped" server.
        self.kill_leftovers();
        if !stopped {
            return Err(format!("dovecot did not stop within {STOP_TIMEOUT:?}"));
        }
        Ok(())
    }

    /// Saves the second a stopping master idles at the end.
    ///
    /// Once every other child has exited, Dovecot's master signals its log
    /// process and sleeps a fixed second before exiting. Nothing is left to
    /// wait for then, so the master is killed as soon as the log process is
    /// its only child; the log process exits when the master's pipe closes.
    /// Without `/proc/<pid>/task/<pid>/children` this waits the second.
    fn skip_final_pause(&self, child: &mut Child) {
        let Some(pid) = self.master_pid() else {
            return;
        };
        let only_log_left = net::poll_until(STOP_TIMEOUT, || {
            only_log_process_left(&pid) || child.try_wait().ok().flatten().is_some()
        });
        if only_log_left {
            self.kill_master();
        }
    }

    /// The master's pid from `master.pid`, if it wrote one.
    fn master_pid(&self) -> Option<String> {
        let pid = read_lossy(&self.layout.base_dir().join("master.pid"));
        let pid = pid.trim();
        (!pid.is_empty()).then(|| pid.to_string())
    }

    /// SIGKILLs every process left of this instance (they carry its name).
    fn kill_leftovers(&self) {
        let pattern = format!("^dovecot-{}/", self.layout.instance());
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
    }

    /// SIGKILLs the master (if it still runs).
    fn kill_master(&self) {
        if let Some(pid) = self.master_pid() {
            let _ = Command::new("/bin/sh")
                .args(["-c", r#"kill -KILL "$1" 2>/dev/null"#, "kill", &pid])
                .status();
        }
    }

    /// Checks that every port of the instance refuses connections.
    fn wait_ports_closed(&self) -> Result<(), String> {
        for port in self.ports.all() {
            if !net::wait_for_port_closed(port, STOP_TIMEOUT) {
                return Err(format!("port {port} still open after dovecot stopped"));
            }
        }
        Ok(())
    }

    /// Whether the last launch failed because a port was taken.
    fn lost_a_port(&self) -> bool {
        self.diagnostics().contains("Address already in use")
    }

    /// Panics with what Dovecot said about a failed start.
    fn fail_start(&self, error: LaunchError) -> ! {
        panic!(
            "dovecot did not start on 127.0.0.1:{}: {error:?}\n{}",
            self.ports.imap,
            self.diagnostics()
        )
    }

    /// Dovecot's stderr and log, for panic messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- {} ---\n{}--- {} ---\n{}",
            self.layout.stderr().display(),
            read_lossy(&self.layout.stderr()),
            self.layout.log().display(),
            self.log()
        )
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Err(problem) = self.shutdown() {
            eprintln!("stopping dovecot in {}: {problem}", self.dir().display());
        }
    }
}

impl Ports {
    /// Fresh ports for what `opts` asks for.
    /// Distinct free ports for the listeners `opts` asks for.
    fn pick(opts: &DovecotOpts) -> Ports {
        let mut free = net::free_ports(4).into_iter();
        let mut next = || free.next().expect("four ports");
        let imap = next();
        let imaps = opts.tls.then(&mut next);
        let submission = opts.submission.map(|_| next());
        let submissions = opts.submission.and_then(|_| opts.tls.then(&mut next));
        Ports {
            imap,
            imaps,
            submission,
            submissions,
        }
    }

    /// Every port that is in use.
    fn all(&self) -> Vec<u16> {
        let optional = [self.imaps, self.submission, self.submissions];
        std::iter::once(self.imap)
            .chain(optional.into_iter().flatten())
            .collect()
    }
}

impl Layout {
    fn config(&self) -> PathBuf {
        self.root.join("dovecot.conf")
    }

    fn log(&self) -> PathBuf {
        self.root.join("dovecot.log")
    }

    fn stderr(&self) -> PathBuf {
        self.root.join("dovecot.stderr")
    }

    fn master_passwd(&self) -> PathBuf {
        self.root.join("passwd.master")
    }

    fn users_passwd(&self) -> PathBuf {
        self.root.join("passwd.users")
    }

    /// The users of a proxy instance for `service` (`passwd.proxy.imap`).
    fn proxy_passwd(&self, service: &str) -> PathBuf {
        self.root.join(format!("passwd.proxy.{service}"))
    }

    fn base_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn mail_root(&self) -> PathBuf {
        self.root.join("mail")
    }

    fn maildir(&self, user: &str) -> PathBuf {
        self.mail_root().join(passwd_name(user)).join("Maildir")
    }

    /// A name unique to this instance (the temporary directory's name).
    fn instance(&self) -> String {
        let name = self.root.file_name().expect("temporary directory name");
        format!("usher-test-{}", name.to_string_lossy())
    }

    /// The greeting text, unique per instance so that the readiness check
    /// cannot mistake another server on a reused port for this one.
    fn greeting(&self) -> String {
        format!("Dovecot ready ({}).", self.instance())
    }
}

impl RunAs {
    /// Whom the test process runs as, judged by who owns `dir`, which the
    /// test process has just created.
    fn current(dir: &Path) -> RunAs {
        let meta = fs::metadata(dir).expect("stat temporary directory");
        if meta.uid() == 0 {
            return RunAs::Root;
        }
        RunAs::User {
            name: id_output("-un"),
            group: id_output("-gn"),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// The uid and gid mail processes run as.
    fn mail_ids(&self) -> (u32, u32) {
        match self {
            RunAs::Root => NOBODY,
            RunAs::User { uid, gid, .. } => (*uid, *gid),
        }
    }

    /// Hands `path` to the mail processes' user (only needed as root).
    fn give_away(&self, path: &Path) {
        if let RunAs::Root = self {
            let (uid, gid) = NOBODY;
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

/// The output of `id <flag>`, for the user and group names.
fn id_output(flag: &str) -> String {
    let output = Command::new("id").arg(flag).output().expect("run id");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Panics with the way out when a Dovecot binary is missing.
fn require_installed(binary: &str) {
    if !Path::new(binary).exists() {
        panic!(
            "{binary} not found: these tests need Dovecot (Debian packages \
             dovecot-imapd, dovecot-submissiond, dovecot-lmtpd). Run \
             scripts/test.sh, which installs it (or scripts/install-deps.sh)."
        );
    }
}

/// Creates the directory tree and the password files.
fn prepare_dir(layout: &Layout, run_as: &RunAs) {
    // Login, auth and mail processes run as other users when we are root.
    set_mode(&layout.root, 0o755);
    for dir in [layout.base_dir(), layout.state_dir(), layout.mail_root()] {
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    run_as.give_away(&layout.mail_root());
    let master = format!("{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}\n");
    fs::write(layout.master_passwd(), master).expect("write passwd.master");
    write_passwd(&layout.users_passwd(), &[]);
    set_mode(&layout.master_passwd(), 0o644);
}

/// Sets the permission bits of `path`.
fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Creates `dir` and its missing parents below `base`, owned by the mail
/// processes' user.
fn create_owned_dirs(base: &Path, dir: &Path, run_as: &RunAs) {
    if dir.is_dir() {
        return;
    }
    if let Some(parent) = dir.parent().filter(|parent| parent.starts_with(base)) {
        create_owned_dirs(base, parent, run_as);
    }
    fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    run_as.give_away(dir);
}

/// The whole configuration of one instance.
fn render_config(
    layout: &Layout,
    ports: &Ports,
    (opts, tuning): (&DovecotOpts, &Tuning),
    run_as: &RunAs,
) -> String {
    let sizes = Sizes::for_clients(tuning.clients);
    [
        base_config(layout, opts, &sizes),
        identity_config(run_as),
        auth_config(layout, run_as, tuning.proxy),
        mail_config(layout),
        imap_config(ports, &sizes),
        submission_config(ports, opts.submission, &sizes),
        tls_config(opts.tls),
        haproxy_config(tuning.haproxy),
    ]
    .concat()
}

/// Dovecot merges these into the listeners defined above.
fn haproxy_config(haproxy: bool) -> String {
    if !haproxy {
        return String::new();
    }
    "haproxy_trusted_networks = 127.0.0.0/8 ::1/128
service imap-login {
  inet_listener imap {
    haproxy = yes
  }
}
service submission-login {
  inet_listener submission {
    haproxy = yes
  }
}
"
    .to_string()
}

/// Service sizes: the defaults serve about 2,000 sessions; a benchmark
/// asks for more with [`Tuning::clients`].
struct Sizes {
    default_client_limit: usize,
    login_processes: usize,
    imap_processes: usize,
    /// Sessions per imap process: 1 (Dovecot's default) unless tuned. Ten
    /// thousand imap processes would not fit in memory, and each one in
    /// IDLE takes one of the 128 inotify instances the kernel allows per
    /// user, shared with every other Dovecot on the machine.
    imap_clients: usize,
    submission_processes: usize,
}

impl Sizes {
    /// Each login process serves up to 1,000 clients (its client_limit).
    fn for_clients(clients: usize) -> Sizes {
        if clients == 0 {
            return Sizes {
                default_client_limit: 10_000,
                login_processes: 8,
                imap_processes: 4096,
                imap_clients: 1,
                submission_processes: 1024,
            };
        }
        let imap_clients = 500;
        Sizes {
            default_client_limit: (2 * clients).max(10_000),
            login_processes: clients / 1000 + 4,
            imap_processes: clients / imap_clients + 64,
            imap_clients,
            submission_processes: 1024,
        }
    }
}

fn base_config(layout: &Layout, opts: &DovecotOpts, sizes: &Sizes) -> String {
    let protocols = match opts.submission {
        Some(_) => "imap submission",
        None => "imap",
    };
    format!(
        "# Written by tests/common/dovecot.rs; nothing comes from /etc/dovecot.
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
protocols = {protocols}
listen = 127.0.0.1
hostname = localhost
login_greeting = {greeting}
# Lets a proxy on loopback forward the client's address (IMAP ID, XCLIENT).
login_trusted_networks = 127.0.0.0/8 ::1/128
shutdown_clients = yes
# Sized for ~2,000 concurrent sessions (more when tuned): auth, anvil, log
# and stats serve a connection per process.
default_client_limit = {client_limit}
",
        client_limit = sizes.default_client_limit,
        instance = layout.instance(),
        base_dir = layout.base_dir().display(),
        state_dir = layout.state_dir().display(),
        log = layout.log().display(),
        greeting = layout.greeting(),
    )
}

fn identity_config(run_as: &RunAs) -> String {
    match run_as {
        // Dovecot's defaults: login processes as dovenull, auth as dovecot.
        RunAs::Root => String::new(),
        RunAs::User {
            name, group, uid, ..
        } => format!(
            "default_internal_user = {name}
default_internal_group = {group}
default_login_user = {name}
first_valid_uid = {uid}
# Only root may chroot.
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service imap-urlauth-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
"
        ),
    }
}

fn auth_config(layout: &Layout, run_as: &RunAs, proxy: bool) -> String {
    let (uid, gid) = run_as.mail_ids();
    // A proxy's users differ per service only in their backend port; %s
    // is the service (imap, submission).
    let users = match proxy {
        true => layout.root.join("passwd.proxy.%s"),
        false => layout.users_passwd(),
    };
    format!(
        "disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Refuse wrong passwords without the two-second delay.
auth_failure_delay = 0
# Any octets in user names: the default set refuses UTF-8 local parts
# (josé@example.com) that usher forwards as the master login's authzid.
auth_username_chars =
auth_master_user_separator = *
# Any octets in user names: usher's users include josé@example.com.
auth_username_chars =
passdb {{
  driver = passwd-file
  args = {master}
  master = yes
}}
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%u allow_all_users=yes
}}
# Every test logs in from 127.0.0.1; the per-address penalty after failed
# logins (up to 15 s before each attempt) would stall them. Backends behind
# a proxy switch it off the same way.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
",
        master = layout.master_passwd().display(),
        users = users.display(),
        mail = layout.mail_root().display(),
    )
}

fn mail_config(layout: &Layout) -> String {
    format!(
        "mail_location = maildir:{mail}/%u/Maildir
mail_plugins = $mail_plugins notify mail_log
plugin {{
  mail_log_events = save copy delete undelete expunge mailbox_create mailbox_delete
  mail_log_fields = uid box msgid size
}}
",
        mail = layout.mail_root().display(),
    )
}

fn imap_config(ports: &Ports, sizes: &Sizes) -> String {
    format!(
        "service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
  }}
  # Many clients per login process (TLS sessions stay there), prestarted.
  service_count = 0
  client_limit = 1000
  process_min_avail = 2
  process_limit = {login_processes}
}}
service imap {{
  process_limit = {imap_processes}
{imap_clients}}}
protocol imap {{
  # The benchmark logs one user in many times from 127.0.0.1.
  mail_max_userip_connections = 10000
}}
",
        imap = ports.imap,
        imaps = ports.imaps.unwrap_or(0),
        login_processes = sizes.login_processes,
        imap_processes = sizes.imap_processes,
        // Only a tuned instance says it, so the default file is unchanged.
        imap_clients = match sizes.imap_clients {
            1 => String::new(),
            // Only a process that lives on (service_count = 0) takes
            // further clients.
            n => format!("  client_limit = {n}\n  service_count = 0\n"),
        },
    )
}

fn submission_config(ports: &Ports, relay: Option<u16>, sizes: &Sizes) -> String {
    let (Some(relay), Some(port)) = (relay, ports.submission) else {
        return String::new();
    };
    let submissions = match ports.submissions {
        Some(port) => format!(
            "  inet_listener submissions {{
    port = {port}
    ssl = yes
  }}
"
        ),
        None => String::new(),
    };
    format!(
        "submission_relay_host = 127.0.0.1
submission_relay_port = {relay}
submission_relay_trusted = no
submission_relay_ssl = no
service submission-login {{
  inet_listener submission {{
    port = {port}
  }}
{submissions}  service_count = 0
  client_limit = 1000
  process_min_avail = 1
  process_limit = {login_processes}
}}
service submission {{
  process_limit = {submission_processes}
}}
",
        login_processes = sizes.login_processes.min(4),
        submission_processes = sizes.submission_processes,
    )
}

fn tls_config(tls: bool) -> String {
    if !tls {
        return "ssl = no\n".to_string();
    }
    let certs = example_certs_dir();
    format!(
        "ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
",
        cert = certs.join("localhost.crt").display(),
        key = certs.join("localhost.key").display(),
    )
}

/// The directory of the example CA and localhost certificate.
pub fn example_certs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-example")
}

/// The example CA certificate that signed the backends' TLS certificate.
pub fn example_ca_cert() -> PathBuf {
    example_certs_dir().join("ca.crt")
}

/// Hashes `password` the way Dovecot stores it, e.g. with scheme
/// `SHA512-CRYPT`: `{SHA512-CRYPT}$6$…`, made by `doveadm pw`.
pub fn hash_password(scheme: &str, password: &str) -> String {
    require_installed(DOVEADM_BIN);
    // -O: read no configuration; hashing needs none.
    let output = Command::new(DOVEADM_BIN)
        .args(["-O", "pw", "-s", scheme, "-p", password])
        .output()
        .expect("run doveadm pw");
    assert!(
        output.status.success(),
        "doveadm pw -s {scheme} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("doveadm pw prints ASCII")
        .trim()
        .to_string()
}

/// The name Dovecot looks a login up by (`auth_username_format = %Lu`).
fn passwd_name(user: &str) -> String {
    assert!(
        !user.is_empty() && !user.contains([':', '\n', '\r', '\0', '/']),
        "user name {user:?} cannot be a passwd-file entry or a directory name"
    );
    user.to_ascii_lowercase()
}

/// The `(user, hash)` entries of a passwd-file.
fn read_passwd(path: &Path) -> Vec<(String, String)> {
    read_lossy(path)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(user, hash)| (user.to_string(), hash.to_string()))
        .collect()
}

/// Writes a passwd-file, readable by Dovecot's auth process.
fn write_passwd(path: &Path, entries: &[(String, String)]) {
    let text: String = entries
        .iter()
        .map(|(user, hash)| format!("{user}:{hash}\n"))
        .collect();
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, 0o644);
}

/// Dovecot's passwd-file driver checks the file at most once per second of
/// its event loop's clock, so a change is seen only by lookups in a later
/// second than the last check. Sleeping into the next second ensures that.
fn sleep_into_next_second() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let rest = Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
    thread::sleep(rest + Duration::from_millis(50));
}

/// A Maildir file name unique within this machine.
fn unique_maildir_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.M{}P{}Q{count}.localhost",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id()
    )
}

/// The regular files directly in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|entry| entry.expect("read Maildir entry").path())
        .filter(|path| path.is_file())
        .collect()
}

/// A file as text, empty if it does not exist.
fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Whether the Dovecot master `pid` has no child left but its log process
/// (false if that cannot be told).
fn only_log_process_left(pid: &str) -> bool {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let Ok(children) = fs::read_to_string(path) else {
        return false;
    };
    children.split_whitespace().all(|child| {
        // A child may exit between the listing and this read; one that is
        // gone no longer counts.
        match fs::read(format!("/proc/{child}/cmdline")) {
            Ok(cmdline) => String::from_utf8_lossy(&cmdline)
                .trim_end_matches('\0')
                .ends_with("/log"),
            Err(_) => true,
        }
    })
}

/// Polls until `child` exits; `None` if it still runs after `timeout`.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    net::poll_until(timeout, || {
        status = child.try_wait().expect("wait for dovecot");
        status.is_some()
    });
    status
}

/// Waits until the IMAP port sends this instance's greeting.
fn wait_ready(
    child: &mut Child,
    port: u16,
    greeting: &str,
    haproxy: bool,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait for dovecot") {
            return Err(LaunchError::Exited(status));
        }
        if read_greeting(port, haproxy).is_some_and(|line| is_greeting(&line, greeting)) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(LaunchError::TimedOut)
}

/// The first line a server on `port` sends, if it accepts and sends one.
/// The first line on `port`; a listener that expects a PROXY header gets
/// a version 1 `UNKNOWN` one first (a connection of the proxy's own).
fn read_greeting(port: u16, haproxy: bool) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&net::loopback(port), Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    if haproxy {
        stream.write_all(b"PROXY UNKNOWN\r\n").ok()?;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

fn is_greeting(line: &str, greeting: &str) -> bool {
    line.starts_with("* OK ") && line.trim_end().ends_with(greeting)
}
