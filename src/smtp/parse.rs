//! Submission wire parsing: bytes in, values out, no sockets.
//!
//! Four pure pieces, each testable byte by byte:
//! - [`frame_line`] and [`parse_command`]: one client command line before
//!   AUTH (RFC 5321 §4.1.1, RFC 6409 §4);
//! - [`parse_sasl_response`], [`parse_initial_response`] and
//!   [`split_plain`]: the SASL exchange of AUTH (RFC 4954 §4, RFC 4616);
//! - [`parse_reply`] and [`extensions`]: a backend's reply, as `ddd-` /
//!   `ddd ` line groups, and the extensions its EHLO reply lists
//!   (RFC 5321 §4.2, §4.1.1.1);
//! - [`xtext`]: the encoding of XCLIENT attribute values (RFC 3461 §4).
//!
//! Invariants:
//! - a command line is judged only once it is complete, and never beyond
//!   the line limit: an over-long line is reported, not cut into pieces
//!   whose tail could pass for a new command (case C07);
//! - an EHLO/HELO argument is exactly one token with no controls, so it
//!   can be forwarded as one XCLIENT value and cannot smuggle a second
//!   attribute (case C30);
//! - a BDAT size is digits only, and one that overflows is refused rather
//!   than wrapped (RFC 3030 §2, case C33);
//! - SASL responses are strict base64 (RFC 4954 §4): `*` cancels, `=`
//!   alone is an empty initial response, anything else that is not base64
//!   is an error, never a partial decode (case C11);
//! - a backend reply is accepted only as well-formed line groups with one
//!   code, within a cap on lines and octets; a short, mixed-code or
//!   over-long reply is an error, not a guess (case C28).

use base64::Engine;

use crate::secret::Secret;

/// Where the first command line in a buffer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// The first this-many bytes are one whole line, line end included.
    Line(usize),
    /// More bytes are needed.
    Incomplete,
    /// The line already exceeds the limit (line end excluded).
    TooLong,
}

/// Finds the first line of `buf`, allowing at most `limit` octets of text.
pub fn frame_line(buf: &[u8], limit: usize) -> Framed {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if trim_eol(&buf[..=i]).len() > limit => Framed::TooLong,
        Some(i) => Framed::Line(i + 1),
        // A CR may still be followed by its LF: do not count it yet.
        None if trim_eol_partial(buf).len() > limit => Framed::TooLong,
        None => Framed::Incomplete,
    }
}

/// Strips the line end: CRLF, or a bare LF from lenient clients.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_eol_partial(buf: &[u8]) -> &[u8] {
    buf.strip_suffix(b"\r").unwrap_or(buf)
}

/// A SASL mechanism usher offers (RFC 4954 §4; RFC 4616 PLAIN; LOGIN as
/// deployed, draft-murchison-sasl-login).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// One parsed command line before AUTH.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// EHLO (`extended`) or HELO, with the client's domain or address
    /// literal.
    Hello {
        extended: bool,
        domain: String,
    },
    StartTls,
    Auth {
        mechanism: Mechanism,
        initial: Option<Secret<Vec<u8>>>,
    },
    Rset,
    Noop,
    Quit,
    Help,
    /// BDAT (RFC 3030 §2): `size` octets of chunk data follow the line.
    Bdat {
        size: u64,
    },
    /// MAIL, RCPT, DATA, VRFY, EXPN: only after AUTH (RFC 6409 §4.3).
    NeedsAuth,
    /// XCLIENT: a proxy-to-server command, never honoured from clients
    /// (case C31).
    Xclient,
    /// A verb usher does not know (including a client's `PROXY` line).
    Unknown,
}

/// Why a command line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    /// Wrong or missing parameters (501).
    Syntax,
    /// An EHLO/HELO argument that is not one clean token (501).
    BadDomain,
    /// AUTH with a mechanism usher does not offer (504).
    UnknownMechanism,
    /// An AUTH initial response that is not base64 (501).
    BadBase64,
    /// A BDAT whose size cannot be read: its chunk cannot be skipped, so
    /// the stream cannot be resynchronised.
    BadChunkSize,
}

/// Longest EHLO/HELO argument: a domain is at most 255 octets
/// (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;

/// Parses one command line (without its line end).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let verb = verb.to_ascii_uppercase();
    match verb.as_slice() {
        b"EHLO" => hello(true, rest),
        b"HELO" => hello(false, rest),
        b"STARTTLS" => bare(rest, Command::StartTls),
        b"AUTH" => auth(rest.unwrap_or_default()),
        b"RSET" => bare(rest, Command::Rset),
        b"QUIT" => bare(rest, Command::Quit),
        // NOOP and HELP may carry a string argument (RFC 5321 §4.1.1.9,
        // §4.1.1.8); it is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"BDAT" => bdat(rest.unwrap_or_default()),
        b"MAIL" | b"RCPT" | b"DATA" | b"VRFY" | b"EXPN" => Ok(Command::NeedsAuth),
        b"XCLIENT" => Ok(Command::Xclient),
        _ => Ok(Command::Unknown),
    }
}

/// A command that takes no parameters.
fn bare(rest: Option<&[u8]>, command: Command) -> Result<Command, CommandError> {
    match rest {
        Some(r) if !r.iter().all(|&b| b == b' ' || b == b'\t') => Err(CommandError::Syntax),
        _ => Ok(command),
    }
}

/// EHLO/HELO: one token, printable (8-bit allowed for RFC 6531 U-labels),
/// no spaces or controls (case C30).
fn hello(extended: bool, rest: Option<&[u8]>) -> Result<Command, CommandError> {
    let arg = trim_blanks(rest.unwrap_or_default());
    let clean = |b: &u8| *b > b' ' && *b != 0x7f;
    if arg.is_empty() || arg.len() > MAX_DOMAIN || !arg.iter().all(clean) {
        return Err(CommandError::BadDomain);
    }
    let domain = String::from_utf8(arg.to_vec()).map_err(|_| CommandError::BadDomain)?;
    Ok(Command::Hello { extended, domain })
}

fn trim_blanks(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end]
}

/// `AUTH mechanism [initial-response]` (RFC 4954 §4).
fn auth(rest: &[u8]) -> Result<Command, CommandError> {
    let mut words = rest.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let mechanism = match words.next().map(|m| m.to_ascii_uppercase()) {
        None => return Err(CommandError::Syntax),
        Some(m) if m == b"PLAIN" => Mechanism::Plain,
        Some(m) if m == b"LOGIN" => Mechanism::Login,
        Some(_) => return Err(CommandError::UnknownMechanism),
    };
    let initial = match words.next() {
        None => None,
        Some(ir) => Some(parse_initial_response(ir).map_err(|_| CommandError::BadBase64)?),
    };
    if words.next().is_some() {
        return Err(CommandError::Syntax);
    }
    Ok(Command::Auth { mechanism, initial })
}

/// `BDAT size [LAST]` (RFC 3030 §2).
fn bdat(rest: &[u8]) -> Result<Command, CommandError> {
    let mut words = rest.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size = words.next().ok_or(CommandError::BadChunkSize)?;
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) {
        return Err(CommandError::BadChunkSize);
    }
    let size = std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(CommandError::BadChunkSize)?;
    // The size is known, so the chunk can be skipped even if what follows
    // it is wrong: that is an ordinary syntax error, answered after the
    // chunk.
    Ok(Command::Bdat { size })
}

/// A SASL response that is not valid base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBase64;

/// A client line in the middle of a SASL exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslResponse {
    /// `*`: the client gives up (RFC 4954 §4).
    Cancel,
    Data(Secret<Vec<u8>>),
}

/// Decodes a response to a `334` challenge (line end removed). An empty
/// line is an empty response.
pub fn parse_sasl_response(line: &[u8]) -> Result<SaslResponse, InvalidBase64> {
    if line == b"*" {
        return Ok(SaslResponse::Cancel);
    }
    decode_base64(line).map(SaslResponse::Data)
}

/// Decodes the initial response on the AUTH line: `=` alone means an empty
/// response (RFC 4954 §4).
pub fn parse_initial_response(token: &[u8]) -> Result<Secret<Vec<u8>>, InvalidBase64> {
    if token == b"=" {
        return Ok(Secret::new(Vec::new()));
    }
    if token.is_empty() {
        return Err(InvalidBase64);
    }
    decode_base64(token)
}

fn decode_base64(data: &[u8]) -> Result<Secret<Vec<u8>>, InvalidBase64> {
    if data.is_empty() {
        return Ok(Secret::new(Vec::new()));
    }
    // Padding is required by RFC 4648 but some clients drop it; the
    // alphabet itself is strict.
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

/// The parts of a SASL PLAIN message (RFC 4616 §2).
#[derive(Debug)]
pub struct Plain {
    pub authzid: Vec<u8>,
    pub authcid: Vec<u8>,
    pub password: Secret<Vec<u8>>,
}

/// Splits `authzid NUL authcid NUL password`: exactly two NULs, so a
/// password with a NUL inside is refused, not truncated (case C35).
pub fn split_plain(message: &[u8]) -> Option<Plain> {
    let mut parts = message.split(|&b| b == 0);
    let authzid = parts.next()?.to_vec();
    let authcid = parts.next()?.to_vec();
    let password = parts.next()?.to_vec();
    if parts.next().is_some() {
        return None;
    }
    Some(Plain {
        authzid,
        authcid,
        password: Secret::new(password),
    })
}

/// Caps on one backend reply (case C28).
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimits {
    /// Lines in one reply; an EHLO reply lists a few dozen at most.
    pub lines: usize,
    /// Octets of one reply, line ends included.
    pub bytes: usize,
}

/// The limits usher applies to backends: RFC 5321 §4.5.3.1.5 allows 512
/// octets per reply line; real EHLO replies stay far below 64 lines.
pub const BACKEND_REPLY_LIMITS: ReplyLimits = ReplyLimits {
    lines: 64,
    bytes: 16 * 1024,
};

/// One complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line after the code and its separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// Why bytes from a backend are not an acceptable reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply longer than {0} octets")]
    TooLong(usize),
    #[error("reply of more than {0} lines")]
    TooManyLines(usize),
    #[error("malformed reply line")]
    Malformed,
    #[error("reply lines with different codes")]
    MixedCodes,
}

/// Parses the first whole reply in `buf`: `Ok(None)` while incomplete,
/// otherwise the reply and the octets it took.
pub fn parse_reply(buf: &[u8], limits: ReplyLimits) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let Some(i) = buf[pos..].iter().position(|&b| b == b'\n') else {
            if buf.len() > limits.bytes {
                return Err(ReplyError::TooLong(limits.bytes));
            }
            return Ok(None);
        };
        let end = pos + i + 1;
        if end > limits.bytes {
            return Err(ReplyError::TooLong(limits.bytes));
        }
        let (line_code, last, text) = reply_line(trim_eol(&buf[pos..end]))?;
        if *code.get_or_insert(line_code) != line_code {
            return Err(ReplyError::MixedCodes);
        }
        lines.push(text);
        if last {
            let code = line_code;
            return Ok(Some((Reply { code, lines }, end)));
        }
        if lines.len() >= limits.lines {
            return Err(ReplyError::TooManyLines(limits.lines));
        }
        pos = end;
    }
}

/// One reply line: `ddd`, then `-` (more lines follow), a space or the
/// end (last line), then text (RFC 5321 §4.2.1).
fn reply_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    if line.len() < 3 {
        return Err(ReplyError::Malformed);
    }
    let (digits, rest) = line.split_at(3);
    let valid = (b'2'..=b'5').contains(&digits[0])
        && (b'0'..=b'5').contains(&digits[1])
        && digits[2].is_ascii_digit();
    if !valid {
        return Err(ReplyError::Malformed);
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let (last, text) = match rest.split_first() {
        None => (true, &[][..]),
        Some((b' ', text)) => (true, text),
        Some((b'-', text)) => (false, text),
        Some(_) => return Err(ReplyError::Malformed),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// One service extension from an EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The keyword, upper-cased.
    pub keyword: String,
    pub params: Vec<String>,
}

/// The extensions listed by a positive EHLO reply (the first line is the
/// server's name, not an extension).
pub fn extensions(reply: &Reply) -> Vec<Extension> {
    reply
        .lines
        .iter()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next()?.to_ascii_uppercase();
            Some(Extension {
                keyword,
                params: words.map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Finds `keyword` among `exts`.
pub fn find<'a>(exts: &'a [Extension], keyword: &str) -> Option<&'a Extension> {
    exts.iter()
        .find(|e| e.keyword.eq_ignore_ascii_case(keyword))
}

/// xtext (RFC 3461 §4): `!`..`~` stand for themselves except `+` and `=`;
/// every other octet is `+` and two upper-case hex digits.
pub fn xtext(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_of_a_line_is_incomplete() {
        let line = b"EHLO client.example.net\r\n";
        for n in 0..line.len() {
            assert_eq!(frame_line(&line[..n], 512), Framed::Incomplete, "{n}");
        }
        assert_eq!(frame_line(line, 512), Framed::Line(line.len()));
        assert_eq!(frame_line(b"NOOP\nQUIT\r\n", 512), Framed::Line(5));
    }

    #[test]
    fn over_long_lines_are_reported_before_their_end() {
        assert_eq!(frame_line(&[b'a'; 513], 512), Framed::TooLong);
        let mut line = vec![b'a'; 512];
        assert_eq!(frame_line(&line, 512), Framed::Incomplete);
        line.extend_from_slice(b"\r");
        assert_eq!(frame_line(&line, 512), Framed::Incomplete);
        line.extend_from_slice(b"\n");
        assert_eq!(frame_line(&line, 512), Framed::Line(514));
        line.insert(0, b'b');
        assert_eq!(frame_line(&line, 512), Framed::TooLong);
    }

    #[test]
    fn commands_by_verb_in_any_case() {
        let hello = |d: &str| Command::Hello {
            extended: true,
            domain: d.into(),
        };
        assert_eq!(
            parse_command(b"ehlo client.example.net"),
            Ok(hello("client.example.net"))
        );
        assert_eq!(
            parse_command(b"EHLO [192.0.2.10]"),
            Ok(hello("[192.0.2.10]"))
        );
        assert_eq!(
            parse_command(b"HELO x"),
            Ok(Command::Hello {
                extended: false,
                domain: "x".into()
            })
        );
        assert_eq!(parse_command(b"StartTLS"), Ok(Command::StartTls));
        assert_eq!(parse_command(b"STARTTLS now"), Err(CommandError::Syntax));
        assert_eq!(parse_command(b"RSET"), Ok(Command::Rset));
        assert_eq!(parse_command(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse_command(b"QUIT"), Ok(Command::Quit));
        assert_eq!(
            parse_command(b"MAIL FROM:<a@example.com>"),
            Ok(Command::NeedsAuth)
        );
        assert_eq!(parse_command(b"DATA"), Ok(Command::NeedsAuth));
        assert_eq!(
            parse_command(b"XCLIENT ADDR=198.51.100.99"),
            Ok(Command::Xclient)
        );
        assert_eq!(
            parse_command(b"PROXY TCP4 198.51.100.99 192.0.2.1 9999 587"),
            Ok(Command::Unknown)
        );
        assert_eq!(parse_command(b""), Ok(Command::Unknown));
    }

    #[test]
    fn hello_argument_is_one_clean_token() {
        // Case C30: no second attribute can hide in the EHLO argument.
        for bad in [
            &b"EHLO x ADDR=203.0.113.66"[..],
            b"EHLO",
            b"EHLO ",
            b"EHLO a\tb",
            b"EHLO a\x00b",
            b"EHLO a\x7fb",
            b"EHLO \xff\xfe",
        ] {
            assert_eq!(parse_command(bad), Err(CommandError::BadDomain), "{bad:?}");
        }
        let long = format!("EHLO {}", "a".repeat(MAX_DOMAIN + 1));
        assert_eq!(parse_command(long.as_bytes()), Err(CommandError::BadDomain));
        assert_eq!(
            parse_command("EHLO bücher.example".as_bytes()),
            Ok(Command::Hello {
                extended: true,
                domain: "bücher.example".into()
            })
        );
    }

    #[test]
    fn auth_mechanisms_and_initial_responses() {
        let auth = |m, i: Option<&[u8]>| Command::Auth {
            mechanism: m,
            initial: i.map(|b| Secret::new(b.to_vec())),
        };
        assert_eq!(
            parse_command(b"AUTH PLAIN"),
            Ok(auth(Mechanism::Plain, None))
        );
        assert_eq!(
            parse_command(b"auth plain AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA=="),
            Ok(auth(Mechanism::Plain, Some(b"\0alice@example.com\0secret")))
        );
        assert_eq!(
            parse_command(b"AUTH LOGIN YWxpY2VAZXhhbXBsZS5jb20="),
            Ok(auth(Mechanism::Login, Some(b"alice@example.com")))
        );
        assert_eq!(
            parse_command(b"AUTH PLAIN ="),
            Ok(auth(Mechanism::Plain, Some(b"")))
        );
        assert_eq!(parse_command(b"AUTH"), Err(CommandError::Syntax));
        assert_eq!(
            parse_command(b"AUTH CRAM-MD5"),
            Err(CommandError::UnknownMechanism)
        );
        assert_eq!(
            parse_command(b"AUTH PLAIN !!!notbase64"),
            Err(CommandError::BadBase64)
        );
        assert_eq!(parse_command(b"AUTH PLAIN *"), Err(CommandError::BadBase64));
        assert_eq!(
            parse_command(b"AUTH PLAIN AA== x"),
            Err(CommandError::Syntax)
        );
    }

    #[test]
    fn bdat_sizes_are_digits_without_overflow() {
        assert_eq!(parse_command(b"BDAT 6 LAST"), Ok(Command::Bdat { size: 6 }));
        assert_eq!(parse_command(b"bdat 0"), Ok(Command::Bdat { size: 0 }));
        for bad in [
            &b"BDAT"[..],
            b"BDAT -1",
            b"BDAT x",
            b"BDAT 18446744073709551616",
            b"BDAT 99999999999999999999",
        ] {
            assert_eq!(
                parse_command(bad),
                Err(CommandError::BadChunkSize),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sasl_responses() {
        assert_eq!(parse_sasl_response(b"*"), Ok(SaslResponse::Cancel));
        assert_eq!(
            parse_sasl_response(b"c2VjcmV0"),
            Ok(SaslResponse::Data(Secret::new(b"secret".to_vec())))
        );
        assert_eq!(
            parse_sasl_response(b""),
            Ok(SaslResponse::Data(Secret::new(Vec::new())))
        );
        assert_eq!(parse_sasl_response(b"c2Vj cmV0"), Err(InvalidBase64));
        assert_eq!(parse_sasl_response(b"%%%"), Err(InvalidBase64));
        assert_eq!(
            parse_initial_response(b"=").unwrap(),
            Secret::new(Vec::new())
        );
    }

    #[test]
    fn plain_needs_exactly_two_nuls() {
        let p = split_plain(b"\0alice@example.com\0secret").unwrap();
        assert!(p.authzid.is_empty());
        assert_eq!(p.authcid, b"alice@example.com");
        assert_eq!(p.password.expose(), b"secret");
        // Case C35: a third NUL is not a shorter password.
        assert!(split_plain(b"\0alice@example.com\0sec\0ret").is_none());
        assert!(split_plain(b"alice@example.com\0secret").is_none());
        assert!(split_plain(b"").is_none());
    }

    #[test]
    fn replies_single_and_multi_line() {
        let l = BACKEND_REPLY_LIMITS;
        let (r, n) = parse_reply(b"220 backend ESMTP\r\nrest", l)
            .unwrap()
            .unwrap();
        assert_eq!((r.code, n), (220, 19));
        assert_eq!(r.lines, ["backend ESMTP"]);
        let greeting = b"220-backend.example.com ESMTP\r\n220 second greeting line\r\n";
        let (r, n) = parse_reply(greeting, l).unwrap().unwrap();
        assert_eq!((r.code, n, r.lines.len()), (220, greeting.len(), 2));
        let (r, _) = parse_reply(b"250\r\n", l).unwrap().unwrap();
        assert_eq!((r.code, r.lines), (250, vec![String::new()]));
        let (r, _) = parse_reply(b"535-5.7.8 first\r\n535 5.7.8 failed\r\n", l)
            .unwrap()
            .unwrap();
        assert_eq!(r.code, 535);
        assert!(!r.is_positive());
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete() {
        let reply = b"250-backend\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n";
        for n in 0..reply.len() {
            assert_eq!(
                parse_reply(&reply[..n], BACKEND_REPLY_LIMITS),
                Ok(None),
                "{n}"
            );
        }
    }

    #[test]
    fn malformed_and_unbounded_replies_are_errors() {
        let l = BACKEND_REPLY_LIMITS;
        // Case C28: a reply shorter than a code.
        assert_eq!(parse_reply(b"25\r\n", l), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"\r\n", l), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"2x0 ok\r\n", l), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"250_ok\r\n", l), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"650 ok\r\n", l), Err(ReplyError::Malformed));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n", l),
            Err(ReplyError::MixedCodes)
        );
        let endless = b"250-x\r\n".repeat(100_000);
        assert!(matches!(
            parse_reply(&endless, l),
            Err(ReplyError::TooManyLines(_))
        ));
        let wide = [b"250-".to_vec(), vec![b'x'; 20_000]].concat();
        assert!(matches!(parse_reply(&wide, l), Err(ReplyError::TooLong(_))));
    }

    #[test]
    fn ehlo_extensions() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "backend.example.com".into(),
                "pipelining".into(),
                "SIZE 10240000".into(),
                "AUTH PLAIN LOGIN".into(),
            ],
        };
        let exts = extensions(&reply);
        assert_eq!(exts.len(), 3);
        assert_eq!(exts[0].keyword, "PIPELINING");
        assert_eq!(find(&exts, "size").unwrap().params, ["10240000"]);
        assert_eq!(find(&exts, "AUTH").unwrap().params, ["PLAIN", "LOGIN"]);
        assert!(find(&exts, "CHUNKING").is_none());
    }

    #[test]
    fn xtext_encodes_plus_equals_space_and_controls() {
        assert_eq!(
            xtext(b"alice+test=1@example.com"),
            "alice+2Btest+3D1@example.com"
        );
        assert_eq!(xtext(b"a b\r\n"), "a+20b+0D+0A");
        assert_eq!(xtext("jos\u{e9}".as_bytes()), "jos+C3+A9");
        assert_eq!(xtext(b"IPV6:2001:db8::10"), "IPV6:2001:db8::10");
    }
}
