//! The IMAP backend client: log in at the user's backend on their behalf.
//!
//! Invariants:
//! - untagged lines may come at any point before the tagged reply (a second
//!   `* OK` greeting from a slow Dovecot auth process, `* CAPABILITY`); they
//!   are read and never passed to the client (cases C17, C27);
//! - credentials travel only inside SASL PLAIN's base64, so no quoting of
//!   user-controlled octets is ever needed (case C35);
//! - the capabilities returned are the backend's post-login list.

use base64::Engine;
use imap_proto::types::{Capability, Response, ResponseCode, Status};

use crate::backend::{connect_backend, BackendError, BackendTls, ClientAddrs, LineReader};
use crate::config::TlsMode;
use crate::net::Stream;
use crate::secret::Secret;
use crate::store::{Backend, LoginMode};

/// Who usher logs in as.
pub struct Credentials<'a> {
    /// The user whose mailbox is opened.
    pub user: &'a str,
    /// The client's password, used for passthrough backends.
    pub password: &'a Secret<Vec<u8>>,
    /// Master user and password, used for master backends.
    pub master: Option<(&'a str, &'a Secret<String>)>,
}

/// A logged-in backend connection, ready for the relay.
pub struct LoggedIn {
    pub stream: Stream,
    /// Bytes the backend sent after its tagged OK.
    pub pending: Vec<u8>,
    /// The backend's post-login capabilities, space-separated.
    pub capabilities: String,
}

/// What the backend said in one line, reduced to what login needs.
enum Line {
    Untagged {
        caps: Option<Vec<String>>,
        bye: bool,
    },
    Continue,
    Tagged {
        tag: String,
        ok: bool,
        caps: Option<Vec<String>>,
        text: String,
    },
}

/// Logs in at `backend` for `creds`; the caller bounds it with a timeout.
pub async fn login(
    backend: &Backend,
    tls: &BackendTls,
    creds: &Credentials<'_>,
    addrs: ClientAddrs,
    session_id: u64,
) -> Result<LoggedIn, BackendError> {
    let port = backend.imap_port.ok_or_else(|| {
        BackendError::Config(format!("backend {} has no imap_port", backend.name))
    })?;
    let tcp = connect_backend(backend, port, Some(addrs)).await?;
    let stream = match backend.tls {
        TlsMode::Implicit => {
            tls.wrap(tcp, &backend.host, backend.ca_file.as_deref())
                .await?
        }
        _ => Stream::Plain(tcp),
    };
    let mut conn = LineReader::new(stream);
    let mut caps = greeting(&mut conn).await?;
    if backend.tls == TlsMode::Starttls {
        conn = starttls(conn, backend, tls).await?;
        caps = None;
    }
    let caps = match caps {
        Some(c) => c,
        None => capability(&mut conn).await?,
    };
    // ID and AUTHENTICATE go in one write: one round trip fewer per login,
    // and RFC 9051 §5.5 lets a client pipeline these.
    let mut out = Vec::new();
    if backend.forward.is_native() && has(&caps, "ID") {
        out.extend_from_slice(&id_command(addrs, session_id));
    }
    let plain = plain_message(backend.login, creds)?;
    let sasl_ir = has(&caps, "SASL-IR");
    if !has(&caps, "AUTH=PLAIN") {
        return Err(BackendError::Config(format!(
            "backend {} does not offer AUTH=PLAIN",
            backend.name
        )));
    }
    if sasl_ir {
        out.extend_from_slice(b"U2 AUTHENTICATE PLAIN ");
        out.extend_from_slice(plain.expose().as_bytes());
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(b"U2 AUTHENTICATE PLAIN\r\n");
    }
    conn.send(&out).await?;
    let mut post_caps = None;
    loop {
        match read(&mut conn).await? {
            Line::Untagged { bye: true, .. } => return Err(BackendError::Refused("BYE".into())),
            Line::Untagged { caps, .. } => post_caps = caps.or(post_caps),
            Line::Continue if !sasl_ir => {
                let mut line = plain.expose().as_bytes().to_vec();
                line.extend_from_slice(b"\r\n");
                conn.send(&line).await?;
            }
            Line::Continue => return Err(BackendError::Protocol("unexpected continuation".into())),
            // The answer to our ID: its outcome does not matter (case C29).
            Line::Tagged { tag, .. } if tag == "U1" => {}
            Line::Tagged {
                ok: false, text, ..
            } => return Err(BackendError::Refused(text)),
            Line::Tagged { caps, .. } => {
                post_caps = caps.or(post_caps);
                break;
            }
        }
    }
    let capabilities = match post_caps {
        Some(c) => c,
        None => capability(&mut conn).await?,
    };
    let (stream, pending) = conn.into_parts();
    Ok(LoggedIn {
        stream,
        pending,
        capabilities: capabilities.join(" "),
    })
}

/// Reads the greeting: `* OK`, possibly after other untagged lines.
async fn greeting(conn: &mut LineReader) -> Result<Option<Vec<String>>, BackendError> {
    let line = conn.line().await?;
    match parse(&line)? {
        Response::Data {
            status: Status::Ok,
            code,
            ..
        } => Ok(match code {
            Some(ResponseCode::Capabilities(c)) => Some(cap_strings(&c)),
            _ => None,
        }),
        Response::Data {
            status: Status::PreAuth,
            ..
        } => Err(BackendError::Protocol("greeted with PREAUTH".into())),
        Response::Data {
            status: Status::Bye,
            ..
        } => Err(BackendError::Refused("BYE in greeting".into())),
        _ => Err(BackendError::Protocol("no greeting".into())),
    }
}

async fn starttls(
    mut conn: LineReader,
    backend: &Backend,
    tls: &BackendTls,
) -> Result<LineReader, BackendError> {
    conn.send(b"U0 STARTTLS\r\n").await?;
    loop {
        match read(&mut conn).await? {
            Line::Tagged { ok: true, .. } => break,
            Line::Tagged { text, .. } => {
                return Err(BackendError::Tls(format!("STARTTLS refused: {text}")))
            }
            _ => {}
        }
    }
    let (stream, rest) = conn.into_parts();
    if !rest.is_empty() {
        // Anything sent before the handshake could be injected (case C13).
        return Err(BackendError::Protocol("data after STARTTLS reply".into()));
    }
    let Stream::Plain(tcp) = stream else {
        return Err(BackendError::Protocol("STARTTLS inside TLS".into()));
    };
    let stream = tls
        .wrap(tcp, &backend.host, backend.ca_file.as_deref())
        .await?;
    Ok(LineReader::new(stream))
}

async fn capability(conn: &mut LineReader) -> Result<Vec<String>, BackendError> {
    conn.send(b"U3 CAPABILITY\r\n").await?;
    let mut caps = Vec::new();
    loop {
        match read(conn).await? {
            Line::Untagged { caps: Some(c), .. } => caps = c,
            Line::Tagged { ok: true, .. } => return Ok(caps),
            Line::Tagged { text, .. } => {
                return Err(BackendError::Protocol(format!("CAPABILITY: {text}")))
            }
            _ => {}
        }
    }
}

async fn read(conn: &mut LineReader) -> Result<Line, BackendError> {
    let line = conn.line().await?;
    Ok(match parse(&line)? {
        Response::Capabilities(c) => Line::Untagged {
            caps: Some(cap_strings(&c)),
            bye: false,
        },
        Response::Data { status, code, .. } => Line::Untagged {
            caps: code_caps(code),
            bye: status == Status::Bye,
        },
        Response::Continue { .. } => Line::Continue,
        Response::Done {
            tag,
            status,
            code,
            information,
        } => Line::Tagged {
            tag: tag.0,
            ok: status == Status::Ok,
            caps: code_caps(code),
            text: information.map(|i| i.into_owned()).unwrap_or_default(),
        },
        _ => Line::Untagged {
            caps: None,
            bye: false,
        },
    })
}

fn parse(line: &[u8]) -> Result<Response<'_>, BackendError> {
    match imap_proto::parser::parse_response(line) {
        Ok((_, response)) => Ok(response),
        // Untagged data this parser does not know is still untagged data.
        Err(_) if line.starts_with(b"* ") => Ok(Response::Data {
            status: Status::Ok,
            code: None,
            information: None,
        }),
        Err(_) => Err(BackendError::Protocol(format!(
            "unparsable line: {}",
            String::from_utf8_lossy(&line[..line.len().min(80)]).trim_end()
        ))),
    }
}

fn code_caps(code: Option<ResponseCode<'_>>) -> Option<Vec<String>> {
    match code {
        Some(ResponseCode::Capabilities(c)) => Some(cap_strings(&c)),
        _ => None,
    }
}

fn cap_strings(caps: &[Capability<'_>]) -> Vec<String> {
    caps.iter()
        .map(|c| match c {
            Capability::Imap4rev1 => "IMAP4rev1".to_string(),
            Capability::Auth(m) => format!("AUTH={m}"),
            Capability::Atom(a) => a.to_string(),
        })
        .collect()
}

fn has(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// SASL PLAIN for the backend, base64-encoded.
fn plain_message(mode: LoginMode, creds: &Credentials<'_>) -> Result<Secret<String>, BackendError> {
    let mut msg = Vec::new();
    match mode {
        LoginMode::Master => {
            let (master, password) = creds.master.ok_or_else(|| {
                BackendError::Config(
                    "backend login is master, but no master user is configured".into(),
                )
            })?;
            msg.extend_from_slice(creds.user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(master.as_bytes());
            msg.push(0);
            msg.extend_from_slice(password.expose().as_bytes());
        }
        LoginMode::Passthrough => {
            msg.push(0);
            msg.extend_from_slice(creds.user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(creds.password.expose());
        }
    }
    Ok(Secret::new(
        base64::engine::general_purpose::STANDARD.encode(msg),
    ))
}

/// usher's own ID with the real client address (RFC 2971; Dovecot honours
/// the `x-` keys from trusted networks). Built from socket addresses only,
/// never from client input (case C29).
fn id_command(addrs: ClientAddrs, session_id: u64) -> Vec<u8> {
    format!(
        "U1 ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \
         \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\" \"x-session-id\" \"usher-{session_id}\")\r\n",
        addrs.peer.ip(),
        addrs.peer.port(),
        addrs.local.ip(),
        addrs.local.port(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_carries_socket_addresses_only() {
        let addrs = ClientAddrs {
            peer: "[2001:db8::10]:53211".parse().unwrap(),
            local: "192.0.2.1:993".parse().unwrap(),
        };
        let id = String::from_utf8(id_command(addrs, 7)).unwrap();
        assert!(id.contains("\"x-originating-ip\" \"2001:db8::10\""), "{id}");
        assert!(id.contains("\"x-connected-port\" \"993\""));
        assert!(id.ends_with(")\r\n"));
    }

    #[test]
    fn plain_for_master_puts_user_as_authzid() {
        let pw = Secret::new(b"userpw".to_vec());
        let mpw = Secret::new("masterpw".to_string());
        let creds = Credentials {
            user: "alice@example.com",
            password: &pw,
            master: Some(("master", &mpw)),
        };
        let b64 = plain_message(LoginMode::Master, &creds).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.expose())
            .unwrap();
        assert_eq!(raw, b"alice@example.com\0master\0masterpw");
        let b64 = plain_message(LoginMode::Passthrough, &creds).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.expose())
            .unwrap();
        assert_eq!(raw, b"\0alice@example.com\0userpw");
    }

    #[test]
    fn capabilities_from_tagged_ok_and_untagged() {
        let l = parse(b"U2 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n").unwrap();
        let Response::Done { code, .. } = l else {
            panic!()
        };
        assert_eq!(code_caps(code).unwrap(), ["IMAP4rev1", "IDLE", "MOVE"]);
        let l = parse(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n").unwrap();
        let Response::Capabilities(c) = l else {
            panic!()
        };
        assert_eq!(cap_strings(&c), ["IMAP4rev1", "AUTH=PLAIN", "SASL-IR"]);
        assert!(parse(b"* OK Waiting for authentication process to respond..\r\n").is_ok());
    }
}
