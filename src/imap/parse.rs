//! IMAP pre-login wire parsing: bytes in, values out, no sockets.
//!
//! Two layers, both pure:
//! - [`frame`] finds where one command ends in a buffer, literals included,
//!   and tells the session when a synchronising literal needs its `+`;
//! - [`parse_command`] turns one framed command into a [`Command`].
//!
//! Invariants:
//! - a literal's size is checked against the limit before any of it is
//!   buffered, with overflow counted as too large (case C06);
//! - literal octets are taken verbatim: no unescaping, no transcoding
//!   (RFC 9051 §4.3, cases C02 and C03);
//! - a quoted string's only escapes are `\\` and `\"` (RFC 9051 §9,
//!   `quoted-specials`); anything else after a backslash is a syntax error;
//! - a `{N+}` literal never gets a continuation (RFC 7888 §3).

use base64::Engine;

use crate::secret::Secret;

/// Size limits that apply while framing.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Bytes of command text, literals excluded.
    pub line: usize,
    /// Bytes of any one literal.
    pub literal: usize,
}

/// Where the next command in a buffer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first this-many bytes form one whole command, CRLF included.
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// The buffer ends just after a literal announcement whose data starts
    /// at `data_start`; for a synchronising literal the client now waits
    /// for a continuation request.
    AwaitLiteral { data_start: usize, sync: bool },
    /// The command text exceeds the line limit.
    LineTooLong,
    /// A literal announcement is unusable (too large, malformed, overflowing).
    /// `line_end` is just past its CRLF; `sync` is false for `{N+}`, after
    /// which the stream cannot be resynchronised.
    BadLiteral { line_end: usize, sync: bool },
}

/// Whether the command that starts `buf` is LOGIN (tag, space, the verb in
/// any case, then a space): the one pre-login command whose literals carry
/// a password.
pub fn starts_login(buf: &[u8]) -> bool {
    let Some(space) = buf.iter().position(|&b| b == b' ') else {
        return false;
    };
    buf.get(space + 1..space + 7)
        .is_some_and(|verb| verb.eq_ignore_ascii_case(b"LOGIN "))
}

/// Finds the extent of the first command in `buf`.
pub fn frame(buf: &[u8], limits: FrameLimits) -> Frame {
    let mut pos = 0;
    let mut text = 0;
    loop {
        let Some(i) = buf[pos..].iter().position(|&b| b == b'\n') else {
            if text + (buf.len() - pos) > limits.line {
                return Frame::LineTooLong;
            }
            return Frame::Incomplete;
        };
        let line_end = pos + i + 1;
        let line = trim_eol(&buf[pos..line_end]);
        text += line.len();
        if text > limits.line {
            return Frame::LineTooLong;
        }
        match literal_announcement(line) {
            Announced::None => return Frame::Complete(line_end),
            Announced::Bad { sync } => return Frame::BadLiteral { line_end, sync },
            Announced::Literal { size, sync } => {
                if size > limits.literal as u64 {
                    return Frame::BadLiteral { line_end, sync };
                }
                let data_end = line_end + size as usize;
                if buf.len() < data_end {
                    return Frame::AwaitLiteral {
                        data_start: line_end,
                        sync,
                    };
                }
                pos = data_end;
            }
        }
    }
}

/// Finds the first line (for SASL responses, which carry no literals).
/// Returns the line's length including its end, or `None` if incomplete.
pub fn line_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
}

/// Strips the line end: CRLF, or a bare LF from lenient clients.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

enum Announced {
    None,
    Literal { size: u64, sync: bool },
    Bad { sync: bool },
}

/// Reads a `{N}` / `{N+}` at the end of a line.
fn literal_announcement(line: &[u8]) -> Announced {
    let Some(body) = line.strip_suffix(b"}") else {
        return Announced::None;
    };
    let Some(open) = body.iter().rposition(|&b| b == b'{') else {
        return Announced::None;
    };
    let inner = &body[open + 1..];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Announced::Bad { sync };
    }
    let mut size: u64 = 0;
    for d in digits {
        // Too large to represent is too large to accept.
        size = size
            .checked_mul(10)
            .and_then(|s| s.checked_add(u64::from(d - b'0')))
            .unwrap_or(u64::MAX);
    }
    Announced::Literal { size, sync }
}

/// A pre-login command.
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    pub tag: String,
    pub kind: CommandKind,
}

/// The commands usher answers itself before login.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandKind {
    Capability,
    Noop,
    Logout,
    Starttls,
    /// The client's ID parameters; parsed for syntax, never forwarded.
    Id,
    Login {
        user: Vec<u8>,
        password: Secret<Vec<u8>>,
    },
    Authenticate {
        mechanism: Mechanism,
        initial: Option<Secret<Vec<u8>>>,
    },
    /// A well-formed command of a later state (RFC 9051 §6.3, §6.4, and
    /// extensions such as IDLE or MOVE): not valid before login.
    NotYet(String),
    /// A well-formed command name that usher does not know at all.
    Unknown(String),
}

/// Commands of the authenticated and selected states, from RFC 9051 and
/// the extensions clients commonly send: refused as "log in first" rather
/// than as unknown.
const LATER_STATE_COMMANDS: &[&str] = &[
    "APPEND",
    "CHECK",
    "CLOSE",
    "COMPRESS",
    "COPY",
    "CREATE",
    "DELETE",
    "DELETEACL",
    "ENABLE",
    "EXAMINE",
    "EXPUNGE",
    "FETCH",
    "GETACL",
    "GETMETADATA",
    "GETQUOTA",
    "GETQUOTAROOT",
    "IDLE",
    "LIST",
    "LISTRIGHTS",
    "LSUB",
    "MOVE",
    "MYRIGHTS",
    "NAMESPACE",
    "NOTIFY",
    "RENAME",
    "SEARCH",
    "SELECT",
    "SETACL",
    "SETMETADATA",
    "SETQUOTA",
    "SORT",
    "STATUS",
    "STORE",
    "SUBSCRIBE",
    "THREAD",
    "UID",
    "UNSELECT",
    "UNSUBSCRIBE",
];

/// SASL mechanisms usher offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// Why a command could not be parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not even a tag could be read: answered with an untagged BAD.
    NoTag,
    /// Tagged syntax error, with a short reason for the client.
    Syntax { tag: String, reason: &'static str },
}

/// Parses one framed command (as found by [`frame`]).
pub fn parse_command(input: &[u8]) -> Result<Command, ParseError> {
    let mut c = Cursor { input, pos: 0 };
    let tag = c.tag().ok_or(ParseError::NoTag)?;
    let syntax = |reason| ParseError::Syntax {
        tag: tag.clone(),
        reason,
    };
    c.space().ok_or_else(|| syntax("Missing command"))?;
    let name = c.atom().ok_or_else(|| syntax("Missing command"))?;
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let kind = match name.as_str() {
        "CAPABILITY" => CommandKind::Capability,
        "NOOP" => CommandKind::Noop,
        "LOGOUT" => CommandKind::Logout,
        "STARTTLS" => CommandKind::Starttls,
        "ID" => {
            c.space()
                .ok_or_else(|| syntax("ID needs a parameter list or NIL"))?;
            c.id_params()
                .ok_or_else(|| syntax("Invalid ID parameters"))?;
            CommandKind::Id
        }
        "LOGIN" => {
            c.space().ok_or_else(|| syntax("LOGIN needs a user name"))?;
            let user = c.astring().ok_or_else(|| syntax("Invalid user name"))?;
            c.space().ok_or_else(|| syntax("LOGIN needs a password"))?;
            let password = c.astring().ok_or_else(|| syntax("Invalid password"))?;
            CommandKind::Login {
                user,
                password: Secret::new(password),
            }
        }
        "AUTHENTICATE" => {
            c.space()
                .ok_or_else(|| syntax("AUTHENTICATE needs a mechanism"))?;
            let mech = c.atom().ok_or_else(|| syntax("Invalid mechanism"))?;
            let mechanism = match mech.to_ascii_uppercase().as_slice() {
                b"PLAIN" => Mechanism::Plain,
                b"LOGIN" => Mechanism::Login,
                _ => return Err(syntax("Unsupported authentication mechanism")),
            };
            let initial = if c.space().is_some() {
                let ir = c.atom().ok_or_else(|| syntax("Invalid initial response"))?;
                Some(decode_sasl(ir).map_err(|_| syntax("Invalid base64"))?)
            } else {
                None
            };
            CommandKind::Authenticate { mechanism, initial }
        }
        _ if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
            // Skip the arguments of commands that belong to later states.
            c.pos = input.len() - eol_len(input);
            if LATER_STATE_COMMANDS.contains(&name.as_str()) {
                CommandKind::NotYet(name)
            } else {
                CommandKind::Unknown(name)
            }
        }
        _ => return Err(syntax("Unknown command")),
    };
    c.end()
        .ok_or_else(|| syntax("Unexpected characters after command"))?;
    Ok(Command { tag, kind })
}

fn eol_len(input: &[u8]) -> usize {
    input.len() - trim_eol(input).len()
}

/// A SASL response that is not valid base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBase64;

/// One client line in a SASL exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslLine {
    /// `*`: the client gives up (RFC 9051 §6.2.2).
    Cancel,
    Data(Secret<Vec<u8>>),
}

/// Decodes a SASL response line (without its line end).
pub fn parse_sasl_line(line: &[u8]) -> Result<SaslLine, InvalidBase64> {
    if line == b"*" {
        return Ok(SaslLine::Cancel);
    }
    decode_sasl(line).map(SaslLine::Data)
}

/// Base64 as SASL uses it: `=` alone is an empty response; only the
/// base64 alphabet and padding are accepted (case C11).
pub fn decode_sasl(data: &[u8]) -> Result<Secret<Vec<u8>>, InvalidBase64> {
    if data == b"=" || data.is_empty() {
        return Ok(Secret::new(Vec::new()));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(data)
        .map(Secret::new)
        .map_err(|_| InvalidBase64)
}

/// The parts of a SASL PLAIN message (RFC 4616).
#[derive(Debug)]
pub struct PlainCredentials {
    pub authzid: Vec<u8>,
    pub authcid: Vec<u8>,
    pub password: Secret<Vec<u8>>,
}

/// Splits `authzid NUL authcid NUL password`; exactly two NULs (case C35).
pub fn split_plain(message: &[u8]) -> Option<PlainCredentials> {
    let mut parts = message.split(|&b| b == 0);
    let authzid = parts.next()?.to_vec();
    let authcid = parts.next()?.to_vec();
    let password = parts.next()?.to_vec();
    if parts.next().is_some() {
        return None;
    }
    Some(PlainCredentials {
        authzid,
        authcid,
        password: Secret::new(password),
    })
}

/// A read position in one command.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

/// `atom-specials` of RFC 9051 §9, apart from controls and 8-bit.
fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !b"(){%*\"\\]".contains(&b)
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        &self.input[start..self.pos]
    }

    fn tag(&mut self) -> Option<String> {
        let tag = self.take_while(|b| (is_atom_char(b) || b == b']') && b != b'+');
        if tag.is_empty() {
            return None;
        }
        Some(String::from_utf8_lossy(tag).into_owned())
    }

    fn space(&mut self) -> Option<()> {
        (self.peek() == Some(b' ')).then(|| self.pos += 1)
    }

    fn atom(&mut self) -> Option<&'a [u8]> {
        let atom = self.take_while(is_atom_char);
        (!atom.is_empty()).then_some(atom)
    }

    fn end(&mut self) -> Option<()> {
        let rest = &self.input[self.pos..];
        (rest == b"\r\n" || rest == b"\n").then_some(())
    }

    /// `astring`: atom (with `]`), quoted string or literal.
    fn astring(&mut self) -> Option<Vec<u8>> {
        match self.peek()? {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => {
                let a = self.take_while(|b| is_atom_char(b) || b == b']');
                (!a.is_empty()).then(|| a.to_vec())
            }
        }
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    let escaped = *self.input.get(self.pos + 1)?;
                    if escaped != b'"' && escaped != b'\\' {
                        return None;
                    }
                    out.push(escaped);
                    self.pos += 2;
                }
                b'\r' | b'\n' | 0 => return None,
                b => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    /// `{N}` or `{N+}`, CRLF, then N octets taken verbatim.
    fn literal(&mut self) -> Option<Vec<u8>> {
        self.pos += 1;
        let digits = self.take_while(|b| b.is_ascii_digit());
        let size: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
        if self.peek() == Some(b'+') {
            self.pos += 1;
        }
        if self.peek() != Some(b'}') {
            return None;
        }
        self.pos += 1;
        let rest = &self.input[self.pos..];
        let eol = if rest.starts_with(b"\r\n") {
            2
        } else if rest.starts_with(b"\n") {
            1
        } else {
            return None;
        };
        let start = self.pos + eol;
        let data = self.input.get(start..start + size)?;
        self.pos = start + size;
        Some(data.to_vec())
    }

    /// `nstring`: NIL or a string.
    fn nstring(&mut self) -> Option<()> {
        if self.input[self.pos..].len() >= 3
            && self.input[self.pos..self.pos + 3].eq_ignore_ascii_case(b"NIL")
        {
            self.pos += 3;
            return Some(());
        }
        self.string().map(|_| ())
    }

    fn string(&mut self) -> Option<Vec<u8>> {
        match self.peek()? {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => None,
        }
    }

    /// RFC 2971: `"(" string SP nstring *(SP string SP nstring) ")"` or NIL.
    fn id_params(&mut self) -> Option<()> {
        if self.peek() != Some(b'(') {
            return self.nstring_nil_only();
        }
        self.pos += 1;
        if self.peek() == Some(b')') {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.string()?;
            self.space()?;
            self.nstring()?;
            match self.peek()? {
                b')' => {
                    self.pos += 1;
                    return Some(());
                }
                b' ' => self.pos += 1,
                _ => return None,
            }
        }
    }

    fn nstring_nil_only(&mut self) -> Option<()> {
        let word = self.atom()?;
        word.eq_ignore_ascii_case(b"NIL").then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_login_by_its_verb() {
        assert!(starts_login(b"a1 LOGIN {5}\r\n"));
        assert!(starts_login(b"x login alice {8}\r\n"));
        assert!(!starts_login(b"a1 LOGINX {5}\r\n"));
        assert!(!starts_login(b"a1 ID ({4}\r\n"));
        assert!(!starts_login(b"LOGIN"));
        assert!(!starts_login(b"a1 LOG"));
    }

    const L: FrameLimits = FrameLimits {
        line: 8192,
        literal: 4096,
    };

    fn login(cmd: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match parse_command(cmd).unwrap().kind {
            CommandKind::Login { user, password } => (user, password.expose().clone()),
            k => panic!("not a login: {k:?}"),
        }
    }

    #[test]
    fn frames_simple_line() {
        assert_eq!(frame(b"a1 NOOP\r\nrest", L), Frame::Complete(9));
        assert_eq!(frame(b"a1 NOOP", L), Frame::Incomplete);
        assert_eq!(frame(b"a1 NOOP\n", L), Frame::Complete(8));
    }

    #[test]
    fn every_prefix_of_a_literal_login_is_incomplete() {
        let cmd = b"a1 LOGIN {17}\r\nalice@example.com {6}\r\nsecret\r\n";
        for n in 0..cmd.len() {
            let f = frame(&cmd[..n], L);
            assert!(
                matches!(f, Frame::Incomplete | Frame::AwaitLiteral { .. }),
                "prefix {n}: {f:?}"
            );
        }
        assert_eq!(frame(cmd, L), Frame::Complete(cmd.len()));
    }

    #[test]
    fn sync_literal_asks_for_continuation_at_its_data() {
        let f = frame(b"a1 LOGIN {17}\r\n", L);
        assert_eq!(
            f,
            Frame::AwaitLiteral {
                data_start: 15,
                sync: true
            }
        );
        let f = frame(b"a1 LOGIN {17+}\r\nalice", L);
        assert_eq!(
            f,
            Frame::AwaitLiteral {
                data_start: 16,
                sync: false
            }
        );
    }

    #[test]
    fn hostile_literal_sizes_are_refused_before_buffering() {
        for (line, sync) in [
            (&b"a1 LOGIN {400000000}\r\n"[..], true),
            (b"a1 LOGIN {4294967296}\r\n", true),
            (b"a1 LOGIN {18446744073709551616}\r\n", true),
            (b"a1 LOGIN {99999999999999999999999999999}\r\n", true),
            (b"a1 LOGIN {-1}\r\n", true),
            (b"a1 LOGIN {}\r\n", true),
            (b"a1 LOGIN {1x}\r\n", true),
            (b"a1 LOGIN {400000000+}\r\n", false),
        ] {
            assert_eq!(
                frame(line, L),
                Frame::BadLiteral {
                    line_end: line.len(),
                    sync
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn long_lines_are_refused_with_or_without_an_end() {
        let mut long = b"a1 LOGIN alice ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 9000));
        assert_eq!(frame(&long, L), Frame::LineTooLong);
        long.extend_from_slice(b"\r\n");
        assert_eq!(frame(&long, L), Frame::LineTooLong);
    }

    #[test]
    fn literal_bytes_do_not_count_as_command_text() {
        let limits = FrameLimits {
            line: 512,
            literal: 4096,
        };
        let mut cmd = b"a1 LOGIN alice {3000}\r\n".to_vec();
        cmd.extend(std::iter::repeat_n(b'p', 3000));
        cmd.extend_from_slice(b"\r\n");
        assert_eq!(frame(&cmd, limits), Frame::Complete(cmd.len()));
    }

    #[test]
    fn login_atoms_quoted_and_literals() {
        assert_eq!(
            login(b"a LOGIN alice secret\r\n"),
            (b"alice".to_vec(), b"secret".to_vec())
        );
        assert_eq!(
            login(b"a02 LOGIN dave@example.com \"pa\\\"ss\\\\word\"\r\n").1,
            b"pa\"ss\\word".to_vec()
        );
        // C02: quoted \\ becomes one backslash; the literal keeps both.
        let (u, p) = login(b"a01 LOGIN \"EXAMPLE\\\\alice\" {8}\r\nse\\cr\\et\r\n");
        assert_eq!(u, b"EXAMPLE\\alice".to_vec());
        assert_eq!(p, b"se\\cr\\et".to_vec());
        // C01: non-synchronising literals.
        let (u, p) = login(b"a1 LOGIN {17+}\r\nalice@example.com {6+}\r\nsecret\r\n");
        assert_eq!(
            (u.as_slice(), p.as_slice()),
            (&b"alice@example.com"[..], &b"secret"[..])
        );
        // C03: UTF-8 octets pass untouched, in a literal and quoted.
        assert_eq!(
            login("a1 LOGIN carol {11}\r\naccentué1!\r\n".as_bytes()).1,
            "accentué1!".as_bytes()
        );
        assert_eq!(
            login("a1 LOGIN carol \"accentué1!\"\r\n".as_bytes()).1,
            "accentué1!".as_bytes()
        );
    }

    #[test]
    fn bad_syntax_is_tagged() {
        for bad in [
            &b"a1 LOGIN alice\r\n"[..],
            b"a1 LOGIN alice \"unterminated\r\n",
            b"a1 LOGIN alice \"bad\\escape\"\r\n",
            b"a1 LOGIN alice secret extra\r\n",
            b"a1 AUTHENTICATE CRAM-MD5\r\n",
            b"a1 AUTHENTICATE PLAIN AGFs$$$aWNl\r\n",
            b"a1 ID (\"name\")\r\n",
            b"a1 ID\r\n",
            b"a1\r\n",
        ] {
            match parse_command(bad) {
                Err(ParseError::Syntax { tag, .. }) => assert_eq!(tag, "a1"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        assert_eq!(parse_command(b"\r\n"), Err(ParseError::NoTag));
        assert_eq!(parse_command(b"+tag NOOP\r\n"), Err(ParseError::NoTag));
    }

    #[test]
    fn commands_are_case_insensitive_and_later_ones_are_recognised() {
        assert_eq!(
            parse_command(b"a1 starttls\r\n").unwrap().kind,
            CommandKind::Starttls
        );
        assert_eq!(
            parse_command(b"a3 select INBOX\r\n").unwrap().kind,
            CommandKind::NotYet("SELECT".into())
        );
        assert_eq!(
            parse_command(b"a3 XYZZY now\r\n").unwrap().kind,
            CommandKind::Unknown("XYZZY".into())
        );
        assert_eq!(
            parse_command(b"a3 ID NIL\r\n").unwrap().kind,
            CommandKind::Id
        );
        assert_eq!(
            parse_command(b"a2 ID (\"name\" \"ExampleSync\" \"version\" NIL)\r\n")
                .unwrap()
                .kind,
            CommandKind::Id
        );
    }

    #[test]
    fn authenticate_with_initial_response() {
        let cmd = b"a1 AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==\r\n";
        let CommandKind::Authenticate { mechanism, initial } = parse_command(cmd).unwrap().kind
        else {
            panic!()
        };
        assert_eq!(mechanism, Mechanism::Plain);
        let plain = split_plain(initial.unwrap().expose()).unwrap();
        assert_eq!(plain.authcid, b"alice@example.com");
        assert_eq!(plain.password.expose(), b"secret");
        let cmd = b"a1 AUTHENTICATE PLAIN =\r\n";
        let CommandKind::Authenticate { initial, .. } = parse_command(cmd).unwrap().kind else {
            panic!()
        };
        assert!(initial.unwrap().expose().is_empty());
    }

    #[test]
    fn plain_needs_exactly_two_nuls() {
        assert!(split_plain(b"\0alice@example.com\0sec\0ret").is_none());
        assert!(split_plain(b"alice@example.com\0secret").is_none());
        assert!(split_plain(b"\0a\0").is_some());
    }

    #[test]
    fn sasl_lines() {
        assert_eq!(parse_sasl_line(b"*"), Ok(SaslLine::Cancel));
        assert!(parse_sasl_line(b"c2Vj!!cmV0").is_err());
        match parse_sasl_line(b"c2VjcmV0").unwrap() {
            SaslLine::Data(d) => assert_eq!(d.expose(), b"secret"),
            SaslLine::Cancel => panic!(),
        }
    }

    #[test]
    fn parsed_login_prints_no_password() {
        let cmd = parse_command(b"a1 LOGIN alice hunter2secret\r\n").unwrap();
        assert!(!format!("{cmd:?}").contains("hunter2secret"));
        let cmd = parse_command(b"a1 AUTHENTICATE PLAIN AGFsaWNlAGh1bnRlcjJzZWNyZXQ=\r\n").unwrap();
        assert!(!format!("{cmd:?}").contains("hunter2secret"));
    }
}
