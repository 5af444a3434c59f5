//! `pushbus agents put|get|list|delete`: agent registrations from YAML or
//! JSON files, validated before anything is written.

use std::path::PathBuf;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{
    AgentConfig, RefSelector, Watch, WatchKind, Webhook, ref_selector::Kind,
};
use pushbus_shared::service::NatsArgs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// Register or replace an agent from a YAML or JSON file.
    Put {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print one agent as YAML.
    Get { agent_id: String },
    /// List registered agent IDs.
    List,
    /// Remove an agent.
    Delete { agent_id: String },
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
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub refs: RefsFile,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default = "gitops")]
    pub kind: String,
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
}

impl AgentFile {
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let token_sha256 = match (self.token, self.token_sha256) {
            (Some(t), h) if h.is_empty() => hex::encode(Sha256::digest(t.as_bytes())),
            (None, h) => h,
            (Some(_), _) => bail!("give token or token_sha256, not both"),
        };
        let watches = self
            .watches
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let kind = match w.kind.as_str() {
                    "gitops" => WatchKind::Gitops,
                    "configuration" => WatchKind::Configuration,
                    other => {
                        bail!("watches[{i}].kind: unknown kind {other:?} (gitops or configuration)")
                    }
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
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AgentConfig {
            agent_id: self.agent_id,
            watches,
            webhook: self.webhook.map(|w| Webhook {
                url: w.url,
                secret_token: w.secret_token,
            }),
            token_sha256,
        })
    }
}

pub fn parse_file(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: AgentFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    };
    let cfg = file.into_config()?;
    pushbus_filter::agent::compile(&cfg).context("invalid agent")?;
    Ok(cfg)
}

pub async fn run(nats: &NatsArgs, command: AgentsCommand) -> anyhow::Result<()> {
    // Validate files before touching the network: a bad file writes nothing.
    let parsed = match &command {
        AgentsCommand::Put { file } => Some(parse_file(file)?),
        _ => None,
    };
    let client = async_nats::connect(nats.url())
        .await
        .with_context(|| format!("connecting to {}", nats.url()))?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_or_update_key_value(pushbus_shared::topology::agents_bucket())
        .await?;
    match command {
        AgentsCommand::Put { .. } => {
            let cfg = parsed.context("parsed above")?;
            let revision = pushbus_filter::put_agent(&kv, &cfg).await?;
            eprintln!("agent {} stored (revision {revision})", cfg.agent_id);
        }
        AgentsCommand::Get { agent_id } => {
            let bytes = kv
                .get(&agent_id)
                .await?
                .with_context(|| format!("no agent {agent_id:?}"))?;
            let cfg = AgentConfig::decode(bytes.as_ref())?;
            print!("{}", serde_yaml::to_string(&to_file(cfg))?);
        }
        AgentsCommand::List => {
            let mut keys: Vec<String> = kv.keys().await?.try_collect().await?;
            keys.sort();
            for k in keys {
                println!("{k}");
            }
        }
        AgentsCommand::Delete { agent_id } => {
            if !names::is_valid_token(&agent_id) {
                bail!("invalid agent ID {agent_id:?}");
            }
            kv.delete(&agent_id).await?;
            eprintln!("agent {agent_id} deleted");
        }
    }
    Ok(())
}

fn to_file(cfg: AgentConfig) -> AgentFile {
    AgentFile {
        agent_id: cfg.agent_id,
        token: None,
        token_sha256: cfg.token_sha256,
        webhook: cfg.webhook.map(|w| WebhookFile {
            url: w.url,
            secret_token: w.secret_token,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_agent_files() {
        let yaml = "agent_id: a\ntoken: t\nwatches:\n  - project_path: g/p\n    refs: {branch_glob: \"release/*\"}\n    paths: [\"deploy/**\"]\n  - project_id: 3\n    refs: any_tag\n    kind: configuration\n";
        let file: AgentFile = serde_yaml::from_str(yaml).unwrap();
        let cfg = file.into_config().unwrap();
        assert_eq!(cfg.watches.len(), 2);
        assert_eq!(cfg.token_sha256, hex::encode(Sha256::digest(b"t")));
        pushbus_filter::agent::compile(&cfg).unwrap();
        let json = r#"{"agent_id":"a","watches":[{"project_id":1,"refs":{"tag":"v1"}}]}"#;
        let file: AgentFile = serde_json::from_str(json).unwrap();
        assert_eq!(file.watches[0].refs, RefsFile::Tag("v1".into()));
        // Round trip through the stored form.
        let back = to_file(file.into_config().unwrap());
        assert_eq!(back.watches[0].refs, RefsFile::Tag("v1".into()));
        for bad in [
            "agent_id: a\nwatches: []\n",
            "agent_id: a\nwatches:\n  - project_id: 1\n    refs: {bogus: x}\n",
        ] {
            let parsed: Result<AgentFile, _> = serde_yaml::from_str(bad);
            let ok = parsed
                .ok()
                .and_then(|f| f.into_config().ok())
                .is_some_and(|c| pushbus_filter::agent::compile(&c).is_ok());
            assert!(!ok, "accepted {bad:?}");
        }
    }
}
