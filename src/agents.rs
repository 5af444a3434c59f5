//! `pushbus agents put|get|list|delete`: agent registrations from YAML or
//! JSON files, validated before anything is written. `get` never shows a
//! secret. `put` of a file without a token (and not `public: true`) keeps
//! the agent's current token, or for a new agent generates one and prints
//! it, the only time it is ever shown.

use std::path::PathBuf;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use prost::Message;
use pushbus_filter::file::AgentFile;
use pushbus_shared::names;
use pushbus_shared::proto::AgentConfig;
use pushbus_shared::service::NatsArgs;

#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// Register or replace an agent from a YAML or JSON file; a file with
    /// no token keeps the agent's token, or (new agent) gets a generated
    /// one, printed once on stdout.
    Put {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print one agent as YAML, secrets redacted.
    Get { agent_id: String },
    /// List registered agent IDs.
    List,
    /// Remove an agent.
    Delete { agent_id: String },
}

/// A validated agent file.
pub struct Parsed {
    pub config: AgentConfig,
    /// Names no token and is not public: it needs one.
    pub needs_token: bool,
}

pub fn parse_file(path: &std::path::Path) -> anyhow::Result<Parsed> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = if path.extension().is_some_and(|e| e == "json") {
        AgentFile::from_json(text.as_bytes())
    } else {
        AgentFile::from_yaml(&text)
    }
    .with_context(|| format!("in {}", path.display()))?;
    let needs_token = file.token.is_none() && file.token_sha256.is_empty() && !file.public;
    let config = file
        .into_config()
        .with_context(|| format!("in {}", path.display()))?;
    pushbus_filter::agent::compile(&config).context("invalid agent")?;
    Ok(Parsed {
        config,
        needs_token,
    })
}

pub async fn run(nats: &NatsArgs, command: AgentsCommand) -> anyhow::Result<()> {
    // Validate files before touching the network: a bad file writes nothing.
    let parsed = match &command {
        AgentsCommand::Put { file } => Some(parse_file(file)?),
        _ => None,
    };
    let client = crate::connect(nats, "pushbus-agents").await?;
    let js = async_nats::jetstream::new(client);
    let kv = pushbus_shared::topology::open_bucket(
        &js,
        pushbus_shared::topology::agents_bucket(),
        &nats.topology,
    )
    .await?;
    match command {
        AgentsCommand::Put { .. } => {
            let Parsed {
                config: mut cfg,
                needs_token,
            } = parsed.context("parsed above")?;
            let mut generated = None;
            if needs_token {
                // Re-putting a file to change watches must not lock the
                // running agent out: keep the token it has.
                let current = match kv.get(&cfg.agent_id).await? {
                    Some(bytes) => AgentConfig::decode(bytes.as_ref())
                        .map(|c| c.token_sha256)
                        .unwrap_or_default(),
                    None => String::new(),
                };
                if current.is_empty() {
                    let token = pushbus_filter::file::generate_token()?;
                    cfg.token_sha256 = pushbus_filter::file::token_sha256(&token);
                    generated = Some(token);
                } else {
                    eprintln!(
                        "agent {} keeps its token (the file names none; give token: to replace it)",
                        cfg.agent_id
                    );
                    cfg.token_sha256 = current;
                }
            }
            let revision = pushbus_filter::put_agent(&kv, &cfg).await?;
            eprintln!("agent {} stored (revision {revision})", cfg.agent_id);
            if let Some(token) = generated {
                // Only its hash is stored: this is the one chance to see it.
                eprintln!("generated token (shown only now; give it to the agent):");
                println!("{token}");
            }
        }
        AgentsCommand::Get { agent_id } => {
            let bytes = kv
                .get(&agent_id)
                .await?
                .with_context(|| format!("no agent {agent_id:?}"))?;
            let mut cfg = AgentConfig::decode(bytes.as_ref())?;
            pushbus_filter::file::redact(&mut cfg);
            print!("{}", serde_norway::to_string(&AgentFile::from_config(cfg))?);
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
            // As the request API: deleting what is not there is an error,
            // not a success that hides a mistyped ID.
            kv.get(&agent_id)
                .await?
                .with_context(|| format!("no agent {agent_id:?}"))?;
            kv.delete(&agent_id).await?;
            eprintln!("agent {agent_id} deleted");
        }
    }
    Ok(())
}
