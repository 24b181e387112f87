//! usher: one front door for a mail domain served by many mail servers.
//!
//! Mail clients connect to usher for IMAP; usher runs the pre-login
//! dialogue itself, checks the password against the shared store, finds
//! the backend that holds the user's mailbox, logs in there for the user
//! and then copies bytes both ways without interpreting them.
//!
//! The parts, in the order a connection meets them:
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the TOML file, its validation, defaults with reasons |
//! | [`server`] | listeners, accept, connection limits, the per-connection span |
//! | [`proxy_header`] | inbound PROXY protocol v1/v2 from trusted load balancers, read before TLS |
//! | [`net`] | cleartext/TLS streams and TLS set-up |
//! | [`imap`] | the IMAP pre-login server ([`imap::session`]), its pure wire parser ([`imap::parse`]) and the backend client ([`imap::backend`]) |
//! | [`smtp`] | the submission pre-AUTH server ([`smtp::session`]), its pure wire parser ([`smtp::parse`]), the backend client ([`smtp::backend`]) and the choice of backend ([`smtp::pool`]) |
//! | [`auth`] | password hashing and checks, equal-cost failures |
//! | [`store`] | users, aliases, backends and the change feed (SQLite via sqlx, `schema/`) |
//! | [`route`] | which backend serves a user: assignment, fallback, placement, holds, the health map |
//! | [`health`] | the probe loop that feeds the health map |
//! | [`follow`] | the change-feed follower: store changes end sessions, drains |
//! | [`admin`] | the token-protected loopback HTTP endpoint (sessions, kicks, health, metrics) |
//! | [`metrics`] | Prometheus counters and gauges |
//! | [`backend`] | reaching a backend: connect, TLS, line reads |
//! | [`relay`] | the post-login byte pump, idle timeout, kicks, byte counts |
//! | [`sessions`] | the registry of live sessions |
//! | [`cli`] | the helpdesk commands (`usher user …`, `usher backend …`, `usher sessions`, `usher kick`) |
//! | [`secret`] | values that cannot be printed |
//! | [`fuzz`] | fuzzing entry points for the parsers of untrusted bytes (`fuzz/`, `tests/parser_fuzz.rs`) |

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod follow;
pub mod fuzz;
pub mod health;
pub mod imap;
pub mod metrics;
pub mod net;
pub mod proxy_header;
pub mod relay;
pub mod route;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod smtp;
pub mod store;
