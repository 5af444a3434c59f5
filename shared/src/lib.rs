//! What every pushbus service shares: the protocol types, the JetStream bus
//! layer, the stable names of streams/subjects/consumers/buckets, the ops
//! endpoints (health, readiness, metrics) and, behind the `testkit` feature,
//! a controllable `nats-server` for tests.

pub mod bus;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod fallback;
pub mod heads;
pub mod listen;
pub mod names;
pub mod ops;
pub mod process;
pub mod proto;
pub mod secret;
pub mod service;
pub mod status;
pub mod telemetry;
pub mod topology;
pub mod trace;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use envelope::EventMeta;
pub use service::ServiceContext;
