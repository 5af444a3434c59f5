//! The integration suite: real nats-server processes and the real services.

// Helpers outside #[test] fns unwrap too: a panic there fails the test that
// called it, which is what a test helper should do.
#![allow(clippy::unwrap_used)]

mod bus;
mod cluster;
mod compose;
mod doors;
mod e2e;
mod filter;
mod fixtures;
mod guarantees;
mod hook;
mod ingest;
mod lag;
mod notifier;
mod observe;
mod operate;
mod poll;
mod privilege;
mod prune;
mod readme;
mod secrets;
mod secure;
mod support;
mod topology;
mod webhook;
