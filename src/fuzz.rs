//! Entry points for fuzzing the parsers that read untrusted bytes: what a
//! client sends before login, and what a backend answers. Each takes any
//! bytes, runs the parsers the way a session does, and panics only when an
//! invariant breaks (a frame longer than its buffer, a limit not honoured).
//!
//! `fuzz/` drives them with cargo-fuzz (nightly); `tests/parser_fuzz.rs`
//! drives them on the stable toolchain with a seeded mutator, so that every
//! test run exercises them too.

use crate::imap::parse as imap;
use crate::smtp::parse as smtp;

/// The IMAP pre-login path: framing with small limits, then command, SASL
/// and PLAIN parsing of every frame, as a session would consume them.
pub fn imap_prelogin(data: &[u8]) {
    let limits = imap::FrameLimits {
        line: 512,
        literal: 256,
    };
    let mut rest = data;
    for _ in 0..64 {
        match imap::frame(rest, limits) {
            imap::Frame::Complete(n) => {
                assert!(n > 0 && n <= rest.len(), "frame {n} of {}", rest.len());
                let _ = imap::parse_command(&rest[..n]);
                rest = &rest[n..];
            }
            imap::Frame::AwaitLiteral { data_start, .. } => {
                assert!(data_start <= rest.len());
                rest = &rest[data_start..];
            }
            imap::Frame::BadLiteral { line_end, .. } => {
                assert!(line_end > 0 && line_end <= rest.len());
                rest = &rest[line_end..];
            }
            imap::Frame::LineTooLong => {
                assert!(rest.len() > limits.line);
                break;
            }
            imap::Frame::Incomplete => break,
        }
    }
    if let Some(n) = imap::line_len(data) {
        assert!(n <= data.len());
        let line = imap::trim_eol(&data[..n]);
        if let Ok(imap::SaslLine::Data(message)) = imap::parse_sasl_line(line) {
            let _ = imap::split_plain(message.expose());
        }
    }
    let _ = imap::split_plain(data);
}

/// The submission pre-AUTH path and backend replies: line framing,
/// command and SASL parsing, reply parsing within its limits, EHLO
/// keywords and xtext encoding.
pub fn smtp_prelogin(data: &[u8]) {
    let mut rest = data;
    for _ in 0..64 {
        match smtp::frame_line(rest, 512) {
            smtp::Framed::Line(n) => {
                assert!(n > 0 && n <= rest.len());
                let line = &rest[..n];
                let _ = smtp::parse_command(line);
                let text = smtp::trim_eol(line);
                if let Ok(smtp::SaslResponse::Data(d)) = smtp::parse_sasl_response(text) {
                    let _ = smtp::split_plain(d.expose());
                }
                rest = &rest[n..];
            }
            smtp::Framed::TooLong | smtp::Framed::Incomplete => break,
        }
    }
    let limits = smtp::ReplyLimits {
        lines: 8,
        bytes: 1024,
    };
    let mut rest = data;
    while let Ok(Some((reply, used))) = smtp::parse_reply(rest, limits) {
        assert!(used > 0 && used <= rest.len() && used <= limits.bytes);
        let _ = smtp::extensions(&reply);
        rest = &rest[used..];
    }
    let encoded = smtp::xtext(data);
    assert!(encoded
        .bytes()
        .all(|b| (b'!'..=b'~').contains(&b) && b != b'='));
}
