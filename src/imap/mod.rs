//! IMAP: the pre-login server usher runs itself, and the client that logs
//! in at a backend for the user.

pub mod backend;
pub mod parse;
pub mod session;
