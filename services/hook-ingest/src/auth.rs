//! GitLab internal API authentication: a JWT in `Gitlab-Shell-Api-Request`
//! (HS256 over the shared secret, issuer `gitlab-shell`, one-minute life),
//! or the legacy forms (base64 secret in `Gitlab-Shared-Secret`, or the
//! secret as `secret_token`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use pushbus_shared::secret::constant_time_eq;
use sha2::Sha256;

pub const JWT_HEADER: &str = "gitlab-shell-api-request";
pub const LEGACY_HEADER: &str = "gitlab-shared-secret";
pub const ISSUER: &str = "gitlab-shell";
/// Tolerated clock difference between gitlab-shell/Gitaly and us.
pub const CLOCK_SKEW_SECS: i64 = 30;
/// GitLab's tokens live one minute; refuse longer-lived ones.
pub const MAX_LIFETIME_SECS: i64 = 60;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("malformed JWT")]
    Malformed,
    #[error("JWT algorithm must be HS256")]
    Algorithm,
    #[error("bad JWT signature")]
    Signature,
    #[error("JWT issuer must be gitlab-shell")]
    Issuer,
    #[error("JWT expired or not yet valid")]
    Expired,
    #[error("invalid shared secret")]
    Secret,
}

impl AuthError {
    /// The request field a refusal names (None: no credentials at all).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => None,
            AuthError::Secret => Some("secret_token"),
            _ => Some(JWT_HEADER),
        }
    }
}

pub struct Credentials<'a> {
    pub jwt: Option<&'a str>,
    pub legacy_header: Option<&'a str>,
    pub secret_token: Option<&'a str>,
}

pub fn check(secret: &str, creds: &Credentials<'_>, now_unix: i64) -> Result<(), AuthError> {
    if let Some(jwt) = creds.jwt {
        return verify_jwt(secret.as_bytes(), jwt, now_unix);
    }
    let from_header = creds
        .legacy_header
        .and_then(|v| STANDARD.decode(v.trim()).ok())
        .is_some_and(|d| constant_time_eq(d.trim_ascii(), secret.as_bytes()));
    let from_param = creds
        .secret_token
        .is_some_and(|t| constant_time_eq(t.as_bytes(), secret.as_bytes()));
    match (
        from_header || from_param,
        creds.legacy_header.or(creds.secret_token),
    ) {
        (true, _) => Ok(()),
        (false, None) => Err(AuthError::Missing),
        (false, Some(_)) => Err(AuthError::Secret),
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a bearer token has a JWT's form (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

pub fn verify_jwt(secret: &[u8], jwt: &str, now: i64) -> Result<(), AuthError> {
    let mut parts = jwt.trim().split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let decode = |x: &str| {
        URL_SAFE_NO_PAD
            .decode(x.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed)
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| AuthError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(AuthError::Algorithm);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| AuthError::Signature)?;
    mac.update(format!("{h}.{p}").as_bytes());
    mac.verify_slice(&decode(s)?)
        .map_err(|_| AuthError::Signature)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(p)?).map_err(|_| AuthError::Malformed)?;
    if claims.get("iss").and_then(|i| i.as_str()) != Some(ISSUER) {
        return Err(AuthError::Issuer);
    }
    let exp = claims
        .get("exp")
        .and_then(|e| e.as_i64())
        .ok_or(AuthError::Expired)?;
    let iat = claims
        .get("iat")
        .and_then(|e| e.as_i64())
        .unwrap_or(exp - MAX_LIFETIME_SECS);
    let valid = now <= exp + CLOCK_SKEW_SECS
        && now + CLOCK_SKEW_SECS >= iat
        && exp - iat <= MAX_LIFETIME_SECS;
    if valid {
        Ok(())
    } else {
        Err(AuthError::Expired)
    }
}

/// Signs a token the way gitlab-shell does (used by tests and the hook).
pub fn sign_jwt(secret: &[u8], now: i64) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(
        serde_json::json!({ "iss": ISSUER, "iat": now, "exp": now + MAX_LIFETIME_SECS })
            .to_string(),
    );
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(format!("{h}.{p}").as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn jwt_only(jwt: &str) -> Credentials<'_> {
        Credentials {
            jwt: Some(jwt),
            legacy_header: None,
            secret_token: None,
        }
    }

    #[test]
    fn jwt_rules() {
        let good = sign_jwt(b"s3cret", NOW);
        assert_eq!(check("s3cret", &jwt_only(&good), NOW), Ok(()));
        assert_eq!(
            check("s3cret", &jwt_only(&good), NOW + 60 + CLOCK_SKEW_SECS),
            Ok(())
        );
        assert_eq!(
            check("s3cret", &jwt_only(&good), NOW + 120),
            Err(AuthError::Expired)
        );
        assert_eq!(
            check("other", &jwt_only(&good), NOW),
            Err(AuthError::Signature)
        );
        assert_eq!(
            check("s3cret", &jwt_only("a.b"), NOW),
            Err(AuthError::Malformed)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            good.split('.').nth(1).unwrap()
        );
        assert_eq!(
            check("s3cret", &jwt_only(&none_alg), NOW),
            Err(AuthError::Algorithm)
        );
    }

    #[test]
    fn legacy_secret() {
        let b64 = STANDARD.encode("s3cret\n");
        let header = Credentials {
            jwt: None,
            legacy_header: Some(&b64),
            secret_token: None,
        };
        assert_eq!(check("s3cret", &header, NOW), Ok(()));
        assert_eq!(check("nope", &header, NOW), Err(AuthError::Secret));
        let param = Credentials {
            jwt: None,
            legacy_header: None,
            secret_token: Some("s3cret"),
        };
        assert_eq!(check("s3cret", &param, NOW), Ok(()));
        let none = Credentials {
            jwt: None,
            legacy_header: None,
            secret_token: None,
        };
        assert_eq!(check("s3cret", &none, NOW), Err(AuthError::Missing));
    }
}
