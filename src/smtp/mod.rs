//! Submission (RFC 6409): the pre-AUTH server usher runs itself, the SMTP
//! client that logs in at a backend for the user, and the choice of that
//! backend.
//!
//! | module | owns |
//! | --- | --- |
//! | [`parse`] | pure wire parsing: command lines, SASL, backend replies, xtext |
//! | [`session`] | the client dialogue up to `235`, then the hand-off to the relay |
//! | [`backend`] | greeting, EHLO, STARTTLS, XCLIENT and AUTH at a backend |
//! | [`pool`] | which backend takes a session, and the extensions usher advertises |
//!
//! Invariants of the whole protocol:
//! - usher answers only for itself: before AUTH it refuses every mail
//!   command, and after `235` every reply the client sees is the
//!   backend's, so no message is ever acknowledged that a backend did not
//!   accept (case C33);
//! - `235` is sent only after the backend accepted usher's login;
//! - the EHLO reply lists an extension only if every healthy backend offers
//!   it (case C34), plus STARTTLS and AUTH, which usher implements itself;
//! - every reply usher writes is named here, once, in [`reply`].

pub mod backend;
pub mod parse;
pub mod pool;
pub mod session;

/// The replies usher writes itself, with enhanced status codes
/// (RFC 3463, RFC 2034). Each is one whole line, CRLF included.
pub mod reply {
    pub const OK: &str = "250 2.0.0 Ok\r\n";
    pub const BYE: &str = "221 2.0.0 Bye\r\n";
    pub const HELP: &str = "214 2.0.0 usher: see RFC 6409\r\n";
    /// RFC 3207 §4.
    pub const READY_TO_START_TLS: &str = "220 2.0.0 Ready to start TLS\r\n";
    /// RFC 4954 §6.
    pub const AUTH_SUCCESSFUL: &str = "235 2.7.0 Authentication successful\r\n";
    /// The empty challenge of PLAIN: `334`, a space, CRLF (RFC 4954 §4).
    pub const CHALLENGE_EMPTY: &str = "334 \r\n";
    /// base64 of `Username:`.
    pub const CHALLENGE_USERNAME: &str = "334 VXNlcm5hbWU6\r\n";
    /// base64 of `Password:`.
    pub const CHALLENGE_PASSWORD: &str = "334 UGFzc3dvcmQ6\r\n";
    /// Store or backend trouble (RFC 4954 §6); never the user's fault.
    pub const TEMPORARY_AUTH_FAILURE: &str = "454 4.7.0 Temporary authentication failure\r\n";
    pub const TLS_UNAVAILABLE: &str = "454 4.7.0 TLS not available due to temporary reason\r\n";
    pub const UNRECOGNIZED: &str = "500 5.5.2 Error: command not recognized\r\n";
    pub const SYNTAX: &str = "501 5.5.4 Syntax error in parameters or arguments\r\n";
    pub const BAD_DOMAIN: &str = "501 5.5.4 Invalid EHLO/HELO argument\r\n";
    /// `*` from the client (RFC 4954 §4).
    pub const AUTH_CANCELLED: &str = "501 5.7.0 Authentication cancelled\r\n";
    pub const CANNOT_DECODE: &str = "501 5.5.2 Cannot decode response\r\n";
    pub const NOT_IMPLEMENTED: &str = "502 5.5.1 Error: command not implemented\r\n";
    pub const EHLO_FIRST: &str = "503 5.5.1 Error: send EHLO first\r\n";
    pub const TLS_ALREADY_ACTIVE: &str = "503 5.5.1 Error: TLS already active\r\n";
    pub const UNKNOWN_MECHANISM: &str = "504 5.5.4 Unrecognized authentication type\r\n";
    /// RFC 6409 §4.3: mail commands before AUTH.
    pub const AUTH_REQUIRED: &str = "530 5.7.0 Authentication required\r\n";
    /// RFC 4954 §6: one answer for unknown user, wrong password, disabled.
    pub const AUTH_INVALID: &str = "535 5.7.8 Authentication credentials invalid\r\n";
    /// RFC 4954 §6: a password offered on a cleartext connection.
    pub const ENCRYPTION_REQUIRED: &str =
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n";
    /// XCLIENT from a client (case C31).
    pub const NOT_AUTHORIZED: &str = "550 5.7.0 Error: insufficient authorization\r\n";

    /// Why usher closes a connection with `421` (RFC 5321 §3.8).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Closing {
        /// The pre-AUTH deadline passed (case C25).
        Timeout,
        TooManyErrors,
        TooManyFailures,
        LineTooLong,
        /// A BDAT without a readable size: its chunk cannot be skipped.
        Unsynchronised,
        /// A BDAT chunk before AUTH too large to skip.
        ChunkTooLarge,
        /// No byte moved for the relay's idle time.
        Idle,
        Kicked,
        /// The server stops (SIGTERM).
        Shutdown,
    }

    impl Closing {
        /// The whole `421` line, naming usher's `hostname`.
        pub fn line(self, hostname: &str) -> String {
            let text = match self {
                Closing::Timeout => "Error: timeout exceeded",
                Closing::TooManyErrors => "Error: too many errors, closing connection",
                Closing::TooManyFailures => {
                    "Error: too many authentication failures, closing connection"
                }
                Closing::LineTooLong => "Error: line too long, closing connection",
                Closing::Unsynchronised => "Error: unreadable BDAT size, closing connection",
                Closing::ChunkTooLarge => {
                    "Error: BDAT chunk too large before authentication, closing connection"
                }
                Closing::Idle => "Error: idle timeout, closing connection",
                Closing::Kicked => "Session ended by the administrator, closing",
                Closing::Shutdown => "Server shutting down, closing connection",
            };
            // The session ended at a time or size limit, or by a kick, and
            // the client may retry (RFC 3463 X.4.2); a stopping server is
            // "not accepting network messages" (X.3.2).
            let code = match self {
                Closing::Shutdown => "4.3.2",
                _ => "4.4.2",
            };
            format!("421 {code} {hostname} {text}\r\n")
        }
    }

    /// The greeting (RFC 5321 §4.2).
    pub fn greeting(hostname: &str) -> String {
        format!("220 {hostname} ESMTP usher\r\n")
    }

    /// HELO's one-line answer.
    pub fn helo(hostname: &str) -> String {
        format!("250 {hostname}\r\n")
    }

    /// EHLO's answer: the host name, then one extension per line
    /// (RFC 5321 §4.1.1.1).
    pub fn ehlo(lines: &[String]) -> String {
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("250{sep}{line}\r\n"));
        }
        out
    }

    /// The three-digit code of a reply line, for tests and logs.
    pub fn code(reply: &str) -> &str {
        &reply[..3]
    }

    /// A reply without its CRLF, as a line reader returns it.
    pub fn text(reply: &str) -> &str {
        reply.trim_end_matches("\r\n")
    }
}
