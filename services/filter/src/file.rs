//! The agent file format (`agent.yaml` / `agent.json`): what operators
//! write, what `pushbus agents get` prints, and the JSON form of the request
//! API. Only its compiled `AgentConfig` is stored, and what is read back
//! never carries a secret (see [`redact`]).

use pushbus_shared::proto::{
    AgentConfig, RefSelector, Watch, WatchKind, Webhook, ref_selector::Kind,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AgentFileError {
    #[error("give token or token_sha256, not both")]
    TokenTwice,
    #[error("public: a public agent has no token; drop public or the token/token_sha256")]
    PublicWithToken,
    #[error("watches[{0}].kind: unknown kind {1:?} (gitops or configuration)")]
    Kind(usize, String),
    #[error("cannot parse agent JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("cannot parse agent YAML: {0}")]
    Yaml(#[source] serde_norway::Error),
}

/// The file format (`agent.yaml`).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent_id: String,
    /// Plain token; only its SHA-256 is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_sha256: String,
    /// Connects without a token. Without it, an agent with no token is
    /// refused by gitops-notifier (it may still get webhooks).
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
    pub watches: Vec<WatchFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookFile>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    /// `any_branch`, or a one-key map such as `{branch: main}`.
    #[serde(with = "serde_norway::with::singleton_map")]
    pub refs: RefsFile,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default = "gitops")]
    pub kind: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a read shows instead of the token's hash.
pub const REDACTED: &str = "<redacted>";
/// What a read shows instead of a webhook's secret token.
pub const SECRET_SET: &str = "<set>";

/// Blanks out the secrets of a config about to be shown or sent: the token
/// hash (a fast hash of a possibly weak token is as good as the token to an
/// offline guesser) and the webhook's secret token and HMAC key.
pub fn redact(cfg: &mut AgentConfig) {
    if !cfg.token_sha256.is_empty() {
        cfg.token_sha256 = REDACTED.into();
    }
    if let Some(hook) = cfg.webhook.as_mut() {
        for secret in [&mut hook.secret_token, &mut hook.hmac_secret] {
            if !secret.is_empty() {
                *secret = SECRET_SET.into();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot generate an agent token: no randomness from the OS: {0}")]
pub struct TokenError(#[source] getrandom::Error);

/// What the registry stores of a token: its hex SHA-256.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh agent token: 32 random bytes, hex.
pub fn generate_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(TokenError)?;
    Ok(hex::encode(bytes))
}

fn gitops() -> String {
    "gitops".into()
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RefsFile {
    AnyBranch,
    AnyTag,
    AnyRef,
    Branch(String),
    Tag(String),
    BranchGlob(String),
    TagGlob(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    pub url: String,
    #[serde(default)]
    pub secret_token: String,
    /// Signs the body (`X-Signature: sha256=...`, Flux's generic-hmac Receiver).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hmac_secret: String,
}

impl AgentFile {
    pub fn into_config(self) -> Result<AgentConfig, AgentFileError> {
        let token_sha256 = match (self.token, self.token_sha256) {
            (Some(t), h) if h.is_empty() => token_sha256(&t),
            (None, h) => h,
            (Some(_), _) => return Err(AgentFileError::TokenTwice),
        };
        if self.public && !token_sha256.is_empty() {
            return Err(AgentFileError::PublicWithToken);
        }
        let watches = self
            .watches
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let kind = match w.kind.as_str() {
                    "gitops" => WatchKind::Gitops,
                    "configuration" => WatchKind::Configuration,
                    other => return Err(AgentFileError::Kind(i, other.to_owned())),
                };
                let (sel, pattern) = match w.refs {
                    RefsFile::AnyBranch => (Kind::AnyBranch, String::new()),
                    RefsFile::AnyTag => (Kind::AnyTag, String::new()),
                    RefsFile::AnyRef => (Kind::AnyRef, String::new()),
                    RefsFile::Branch(p) => (Kind::Branch, p),
                    RefsFile::Tag(p) => (Kind::Tag, p),
                    RefsFile::BranchGlob(p) => (Kind::BranchGlob, p),
                    RefsFile::TagGlob(p) => (Kind::TagGlob, p),
                };
                Ok(Watch {
                    project_id: w.project_id.unwrap_or(0),
                    project_path: w.project_path.unwrap_or_default(),
                    refs: Some(RefSelector {
                        kind: sel as i32,
                        pattern,
                    }),
                    paths: w.paths,
                    kind: kind as i32,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AgentConfig {
            agent_id: self.agent_id,
            watches,
            webhook: self.webhook.map(|w| Webhook {
                url: w.url,
                secret_token: w.secret_token,
                hmac_secret: w.hmac_secret,
            }),
            token_sha256,
            public: self.public,
        })
    }
}

impl AgentFile {
    pub fn from_json(text: &[u8]) -> Result<Self, AgentFileError> {
        serde_json::from_slice(text).map_err(AgentFileError::Json)
    }

    pub fn from_yaml(text: &str) -> Result<Self, AgentFileError> {
        serde_norway::from_str(text).map_err(AgentFileError::Yaml)
    }

    /// The file form of a stored config (the token itself is never stored).
    pub fn from_config(cfg: AgentConfig) -> AgentFile {
        AgentFile {
            agent_id: cfg.agent_id,
            token: None,
            token_sha256: cfg.token_sha256,
            public: cfg.public,
            webhook: cfg.webhook.map(|w| WebhookFile {
                url: w.url,
                secret_token: w.secret_token,
                hmac_secret: w.hmac_secret,
            }),
            watches: cfg
                .watches
                .into_iter()
                .map(|w| {
                    let sel = w.refs.unwrap_or_default();
                    let refs = match Kind::try_from(sel.kind).unwrap_or(Kind::Unspecified) {
                        Kind::AnyTag => RefsFile::AnyTag,
                        Kind::AnyRef => RefsFile::AnyRef,
                        Kind::Branch => RefsFile::Branch(sel.pattern),
                        Kind::Tag => RefsFile::Tag(sel.pattern),
                        Kind::BranchGlob => RefsFile::BranchGlob(sel.pattern),
                        Kind::TagGlob => RefsFile::TagGlob(sel.pattern),
                        Kind::AnyBranch | Kind::Unspecified => RefsFile::AnyBranch,
                    };
                    WatchFile {
                        project_id: (w.project_id > 0).then_some(w.project_id),
                        project_path: (!w.project_path.is_empty()).then_some(w.project_path),
                        refs,
                        paths: w.paths,
                        kind: if w.kind == WatchKind::Configuration as i32 {
                            "configuration".into()
                        } else {
                            "gitops".into()
                        },
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_agent_files() {
        let yaml = "agent_id: a\ntoken: t\nwatches:\n  - project_path: g/p\n    refs: {branch_glob: \"release/*\"}\n    paths: [\"deploy/**\"]\n  - project_id: 3\n    refs: any_tag\n    kind: configuration\n";
        let file: AgentFile = serde_norway::from_str(yaml).unwrap();
        let cfg = file.into_config().unwrap();
        assert_eq!(cfg.watches.len(), 2);
        assert_eq!(cfg.token_sha256, hex::encode(Sha256::digest(b"t")));
        crate::agent::compile(&cfg).unwrap();
        let json = r#"{"agent_id":"a","watches":[{"project_id":1,"refs":{"tag":"v1"}}]}"#;
        let file: AgentFile = serde_json::from_str(json).unwrap();
        assert_eq!(file.watches[0].refs, RefsFile::Tag("v1".into()));
        let hooked = "agent_id: a\nwatches:\n  - project_id: 1\n    refs: any_branch\nwebhook:\n  url: https://flux.example/hook/x\n  hmac_secret: k\n";
        let cfg = AgentFile::from_yaml(hooked).unwrap().into_config().unwrap();
        let hook = cfg.webhook.clone().unwrap();
        assert_eq!(
            (hook.hmac_secret.as_str(), hook.secret_token.as_str()),
            ("k", "")
        );
        assert_eq!(
            AgentFile::from_config(cfg).webhook.unwrap().hmac_secret,
            "k"
        );
        // Round trip through the stored form.
        let back = AgentFile::from_config(file.into_config().unwrap());
        assert_eq!(back.watches[0].refs, RefsFile::Tag("v1".into()));
        for bad in [
            "agent_id: a\nwatches: []\n",
            "agent_id: a\nwatches:\n  - project_id: 1\n    refs: {bogus: x}\n",
        ] {
            let parsed: Result<AgentFile, _> = serde_norway::from_str(bad);
            let ok = parsed
                .ok()
                .and_then(|f| f.into_config().ok())
                .is_some_and(|c| crate::agent::compile(&c).is_ok());
            assert!(!ok, "accepted {bad:?}");
        }
    }

    #[test]
    fn a_file_that_does_not_parse_keeps_the_parser_error() {
        use std::error::Error as _;
        let err = AgentFile::from_yaml("agent_id: [a\n").unwrap_err();
        assert!(
            err.to_string().starts_with("cannot parse agent YAML: "),
            "{err}"
        );
        assert!(err.source().is_some_and(|s| s.is::<serde_norway::Error>()));
        let err = AgentFile::from_json(b"{\"agent_id\": 1}").unwrap_err();
        assert!(
            err.to_string().starts_with("cannot parse agent JSON: "),
            "{err}"
        );
        assert!(err.source().is_some_and(|s| s.is::<serde_json::Error>()));
    }

    #[test]
    fn public_agents_and_redaction() {
        let yaml = "agent_id: a\npublic: true\nwatches:\n  - project_id: 1\n    refs: any_ref\n";
        let cfg = AgentFile::from_yaml(yaml).unwrap().into_config().unwrap();
        assert!(cfg.public);
        assert!(cfg.token_sha256.is_empty());
        let back = serde_norway::to_string(&AgentFile::from_config(cfg)).unwrap();
        assert!(back.contains("public: true"), "{back}");
        for with_token in ["token: t\n", "token_sha256: abc\n"] {
            let file = AgentFile::from_yaml(&format!("{with_token}{yaml}")).unwrap();
            assert!(matches!(
                file.into_config(),
                Err(AgentFileError::PublicWithToken)
            ));
        }

        let yaml = "agent_id: a\ntoken: s3cret\nwebhook: {url: \"https://x.example/h\", secret_token: hook-s3cret, hmac_secret: hmac-s3cret}\nwatches:\n  - project_id: 1\n    refs: any_ref\n";
        let mut cfg = AgentFile::from_yaml(yaml).unwrap().into_config().unwrap();
        let hash = cfg.token_sha256.clone();
        redact(&mut cfg);
        let shown = serde_json::to_string(&AgentFile::from_config(cfg.clone())).unwrap();
        assert!(shown.contains(r#""token_sha256":"<redacted>""#), "{shown}");
        assert!(shown.contains(r#""secret_token":"<set>""#), "{shown}");
        assert!(shown.contains(r#""hmac_secret":"<set>""#), "{shown}");
        assert!(
            !shown.contains(&hash) && !shown.contains("s3cret"),
            "{shown}"
        );
        // Written back as read, it is refused rather than stored.
        assert!(crate::agent::compile(&cfg).is_err());
        // Nothing to hide: nothing shown.
        let mut open = AgentConfig {
            webhook: Some(Webhook::default()),
            ..Default::default()
        };
        redact(&mut open);
        assert_eq!(open.token_sha256, "");
        assert_eq!(open.webhook.unwrap().secret_token, "");
    }

    #[test]
    fn generated_tokens_are_32_random_bytes() {
        let (a, b) = (generate_token().unwrap(), generate_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
