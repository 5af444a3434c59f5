//! Types generated from `proto/pushbus/v1`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("pushbus.v1");
}

pub use v1::*;

/// The lowercase word the JSON views (SSE, `pushbus events`) use for a ref
/// kind.
pub fn ref_kind_name(kind: i32) -> &'static str {
    match RefKind::try_from(kind) {
        Ok(RefKind::Branch) => "branch",
        Ok(RefKind::Tag) => "tag",
        Ok(RefKind::Other) => "other",
        _ => "unknown",
    }
}

/// The lowercase word the JSON views use for a change kind.
pub fn change_kind_name(kind: i32) -> &'static str {
    match ChangeKind::try_from(kind) {
        Ok(ChangeKind::Create) => "create",
        Ok(ChangeKind::Update) => "update",
        Ok(ChangeKind::Delete) => "delete",
        _ => "unknown",
    }
}
