//! Types generated from `proto/pushbus/v1`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("pushbus.v1");
}

pub use v1::*;
