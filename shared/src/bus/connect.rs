//! How to reach NATS: seed servers, one authentication method, TLS. Secrets
//! are read from files once, kept out of `Debug`, and never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Debug, thiserror::Error)]
pub enum ConnectConfigError {
    #[error("--nats-url is empty")]
    NoServers,
    #[error("--nats-url: {url} is not a nats:// or tls:// server address")]
    BadUrl { url: String },
    #[error(
        "--nats-url: {url} carries credentials, which are not used; give them with \
         --nats-user/--nats-password-file, --nats-token-file, --nats-nkey or --nats-creds"
    )]
    CredentialsInUrl { url: String },
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{0} is not a file")]
    Missing(String),
    #[error("--nats-password-file needs --nats-user, and --nats-user needs --nats-password-file")]
    UserWithoutPassword,
    #[error("--nats-tls-cert and --nats-tls-key go together (mutual TLS)")]
    CertWithoutKey,
    #[error("give at most one of --nats-creds, --nats-nkey, --nats-user, --nats-token-file")]
    SeveralMethods,
}

/// A secret read from a file: never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    /// A `.creds` file (JWT and nkey seed); async-nats reads it.
    Creds(PathBuf),
    /// An nkey seed (`SU…`).
    Nkey(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

impl Auth {
    /// Names the method (and the user, which is not secret) for errors.
    pub fn describe(&self) -> String {
        match self {
            Auth::None => "no authentication".into(),
            Auth::Creds(p) => format!("credentials file {}", p.display()),
            Auth::Nkey(_) => "nkey".into(),
            Auth::UserPassword { user, .. } => format!("user/password (user {user:?})"),
            Auth::Token(_) => "token".into(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for servers that verify clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to connect, validated.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    pub servers: Vec<String>,
    pub auth: Auth,
    pub tls: Tls,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self::plain(DEFAULT_NATS_URL)
    }
}

impl ConnectConfig {
    /// An open server (or comma-separated list), no TLS: local use and tests.
    /// An invalid list is kept as given and fails at connect time.
    pub fn plain(urls: &str) -> Self {
        Self {
            servers: split_urls(urls),
            auth: Auth::None,
            tls: Tls::default(),
        }
    }

    /// The seed list as it may be logged: never any credentials.
    pub fn servers_for_log(&self) -> String {
        self.servers
            .iter()
            .map(|s| redact_url(s))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn requires_tls(&self) -> bool {
        self.tls.ca.is_some()
            || self.tls.client.is_some()
            || self.servers.iter().any(|s| s.starts_with("tls://"))
    }

    pub(crate) async fn options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, std::io::Error> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            // Replies come to `_INBOX.<client name>.…`, so a least-privilege
            // user may subscribe to its own replies and nobody else's.
            .custom_inbox_prefix(inbox_prefix(name))
            // A production bus reconnects for as long as the service runs.
            .max_reconnects(None);
        options = match &self.auth {
            Auth::None => options,
            Auth::Creds(path) => options.credentials_file(path).await?,
            Auth::Nkey(seed) => options.nkey(seed.expose().to_owned()),
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            Auth::Token(token) => options.token(token.expose().to_owned()),
        };
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.requires_tls() {
            options = options.require_tls(true);
        }
        Ok(options)
    }

    pub(crate) fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>, ConnectConfigError> {
        if self.servers.is_empty() {
            return Err(ConnectConfigError::NoServers);
        }
        self.servers.iter().map(|s| parse_server(s)).collect()
    }
}

/// `_INBOX.pushbus-filter` for client `pushbus-filter`.
pub fn inbox_prefix(client_name: &str) -> String {
    format!("_INBOX.{client_name}")
}

/// The flags' values before their files are read.
#[derive(Clone, Debug, Default)]
pub struct ConnectFlags {
    pub url: Option<String>,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl ConnectFlags {
    /// Validates the flags and reads the secret files.
    pub fn resolve(&self, default_url: &str) -> Result<ConnectConfig, ConnectConfigError> {
        let url = self.url.as_deref().unwrap_or(default_url);
        let servers = split_urls(url);
        if servers.is_empty() {
            return Err(ConnectConfigError::NoServers);
        }
        for s in &servers {
            parse_server(s)?;
        }
        let methods = [
            self.creds.is_some(),
            self.nkey.is_some(),
            self.user.is_some() || self.password_file.is_some(),
            self.token_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(ConnectConfigError::SeveralMethods);
        }
        let auth = if let Some(path) = &self.creds {
            // Read here only to fail early and clearly; async-nats reads it again.
            read_secret("--nats-creds file", path)?;
            Auth::Creds(path.clone())
        } else if let Some(path) = &self.nkey {
            Auth::Nkey(read_secret("--nats-nkey seed file", path)?)
        } else if self.user.is_some() || self.password_file.is_some() {
            match (&self.user, &self.password_file) {
                (Some(user), Some(path)) if !user.trim().is_empty() => Auth::UserPassword {
                    user: user.trim().to_owned(),
                    password: read_secret("--nats-password-file", path)?,
                },
                _ => return Err(ConnectConfigError::UserWithoutPassword),
            }
        } else if let Some(path) = &self.token_file {
            Auth::Token(read_secret("--nats-token-file", path)?)
        } else {
            Auth::None
        };
        let client = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                require_file("--nats-tls-cert", cert)?;
                require_file("--nats-tls-key", key)?;
                Some((cert.clone(), key.clone()))
            }
            (None, None) => None,
            _ => return Err(ConnectConfigError::CertWithoutKey),
        };
        if let Some(ca) = &self.tls_ca {
            require_file("--nats-tls-ca", ca)?;
        }
        Ok(ConnectConfig {
            servers,
            auth,
            tls: Tls {
                ca: self.tls_ca.clone(),
                client,
            },
        })
    }
}

fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_server(url: &str) -> Result<async_nats::ServerAddr, ConnectConfigError> {
    let lower = url.to_ascii_lowercase();
    let has_scheme = lower.contains("://");
    if has_scheme && !(lower.starts_with("nats://") || lower.starts_with("tls://")) {
        return Err(ConnectConfigError::BadUrl {
            url: redact_url(url),
        });
    }
    let addr = async_nats::ServerAddr::from_str(url).map_err(|_| ConnectConfigError::BadUrl {
        url: redact_url(url),
    })?;
    if addr.has_user_pass() {
        return Err(ConnectConfigError::CredentialsInUrl {
            url: redact_url(url),
        });
    }
    Ok(addr)
}

/// `nats://user:pass@host:4222` -> `nats://***@host:4222`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

fn require_file(what: &'static str, path: &Path) -> Result<(), ConnectConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConnectConfigError::Missing(format!(
            "{what} {}",
            path.display()
        )))
    }
}

/// A secret file's content, trimmed; empty or whitespace-only is an error
/// (it would otherwise mean "no password" silently).
fn read_secret(what: &'static str, path: &Path) -> Result<Secret, ConnectConfigError> {
    let text = crate::secret::read_file(path).map_err(|source| ConnectConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if text.is_empty() {
        return Err(ConnectConfigError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(Secret(text))
}

/// A permissions violation reported by the server: which operation on
/// which subject was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub operation: String,
    pub subject: String,
}

/// Parses `Permissions Violation for Publish to "x"` (or `Subscription to`).
pub fn parse_denial(message: &str) -> Option<Denial> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("permissions violation for ")?;
    let rest = &message[at + "permissions violation for ".len()..];
    let operation = rest.split_whitespace().next()?.to_ascii_lowercase();
    let open = rest.find('"')?;
    let close = rest[open + 1..].find('"')? + open + 1;
    Some(Denial {
        operation,
        subject: rest[open + 1..close].to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(url: &str) -> ConnectFlags {
        ConnectFlags {
            url: Some(url.into()),
            ..Default::default()
        }
    }

    #[test]
    fn seed_lists() {
        let cfg = flags("nats://a:4222, tls://b:4223 ,c:4224")
            .resolve(DEFAULT_NATS_URL)
            .unwrap();
        assert_eq!(cfg.servers, ["nats://a:4222", "tls://b:4223", "c:4224"]);
        assert_eq!(cfg.server_addrs().unwrap().len(), 3);
        assert!(cfg.requires_tls());
        assert!(matches!(
            flags("http://a:1").resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::BadUrl { .. })
        ));
        assert!(matches!(
            flags(" , ").resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::NoServers)
        ));
        let err = flags("nats://u:hunter2@a:4222")
            .resolve(DEFAULT_NATS_URL)
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn redacts() {
        assert_eq!(redact_url("nats://u:p@h:1"), "nats://***@h:1");
        assert_eq!(redact_url("tls://h:1"), "tls://h:1");
        assert_eq!(redact_url("u:p@h"), "***@h");
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank");
        std::fs::write(&blank, " \n\t").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cret\n").unwrap();
        let mut f = flags("nats://a:1");
        f.token_file = Some(blank.clone());
        assert!(matches!(
            f.resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::Empty { .. })
        ));
        f.token_file = Some(good.clone());
        let cfg = f.resolve(DEFAULT_NATS_URL).unwrap();
        assert!(matches!(&cfg.auth, Auth::Token(t) if t.expose() == "s3cret"));
        assert!(!format!("{cfg:?}").contains("s3cret"));
        f.user = Some("svc".into());
        assert!(matches!(
            f.resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::SeveralMethods)
        ));
        f.token_file = None;
        assert!(matches!(
            f.resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::UserWithoutPassword)
        ));
        f.password_file = Some(good);
        assert!(matches!(
            f.resolve(DEFAULT_NATS_URL).unwrap().auth,
            Auth::UserPassword { .. }
        ));
        let mut t = flags("nats://a:1");
        t.tls_cert = Some(blank);
        assert!(matches!(
            t.resolve(DEFAULT_NATS_URL),
            Err(ConnectConfigError::CertWithoutKey)
        ));
    }

    #[test]
    fn denials() {
        assert_eq!(
            parse_denial(r#"Permissions Violation for Publish to "pushbus.poke.x""#),
            Some(Denial {
                operation: "publish".into(),
                subject: "pushbus.poke.x".into()
            })
        );
        assert_eq!(
            parse_denial(r#"permissions violation for subscription to "a.>" using queue "q""#)
                .map(|d| d.subject),
            Some("a.>".into())
        );
        assert_eq!(parse_denial("maximum payload exceeded"), None);
    }
}
