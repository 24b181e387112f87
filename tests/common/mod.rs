//! Helpers shared by the integration tests.
//!
//! Each test crate includes this module with `mod common;` and uses the parts
//! it needs, so any one crate leaves some helpers unused.
#![allow(dead_code)]

pub mod client;
pub mod dovecot;
pub mod fake;
pub mod fake_smtp;
pub mod net;
pub mod sink;
pub mod smtp;
pub mod usher;
