//! Secrets: read from files, compared without leaking, through timing, how
//! much matched, and taken from bearer credentials.

/// A secret file's content without the surrounding white space (the line
/// end an editor or `echo` leaves); callers decide whether empty is allowed.
pub fn read_file(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// Equal length and equal bytes, in time that depends only on the length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Bearer <token>` -> `<token>`: the one place every door parses a bearer
/// credential (scheme case-insensitive, RFC 7235); empty tokens are none.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The bearer token in an HTTP request's `Authorization` header.
pub fn bearer_header(headers: &axum::http::HeaderMap) -> Option<&str> {
    bearer(
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
}

/// The bearer token in a gRPC call's `authorization` metadata.
pub fn bearer_metadata(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    bearer(md.get("authorization").and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearerabc")), None);
        assert_eq!(bearer(None), None);
    }
}
