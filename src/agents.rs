//! `pushbus agents put|get|list|delete`: agent registrations from YAML or
//! JSON files, validated before anything is written.

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

pub fn parse_file(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = if path.extension().is_some_and(|e| e == "json") {
        AgentFile::from_json(text.as_bytes())
    } else {
        AgentFile::from_yaml(&text)
    }
    .with_context(|| format!("in {}", path.display()))?;
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
            print!("{}", serde_yaml::to_string(&AgentFile::from_config(cfg))?);
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
