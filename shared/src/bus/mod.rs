//! The bus layer: connecting, typed publishing with dedup IDs and awaited
//! acks, typed durable consumption with ordering, retries and dead letters.

mod connect;
mod consume;
mod dead_letter;
mod publish;

use std::time::Duration;

pub use connect::{
    Auth, ConnectConfig, ConnectConfigError, ConnectFlags, DEFAULT_NATS_URL, Denial, Secret, Tls,
    parse_denial, redact_url,
};
pub use consume::{ConsumeError, ConsumerSpec, Delivery, HandleError, Handler, run_consumer};
pub use dead_letter::DeadLetters;
pub use publish::{PendingAck, PublishError, Publisher};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Config(#[from] ConnectConfigError),
    #[error("cannot read {method}: {source}")]
    Credentials {
        method: String,
        source: std::io::Error,
    },
    #[error("nats {servers} refused {method}: {kind}")]
    Refused {
        servers: String,
        method: String,
        kind: async_nats::ConnectErrorKind,
    },
    #[error("cannot connect to nats {servers} ({method}): {source}")]
    Unreachable {
        servers: String,
        method: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "nats {servers} runs nats-server {version}; pushbus needs {}.{} or newer (per-message TTLs)",
        MIN_SERVER.0,
        MIN_SERVER.1
    )]
    ServerTooOld { servers: String, version: String },
}

/// The oldest nats-server pushbus works with: ref-head tombstones and
/// removal markers use per-message TTLs (2.11). An older server refuses the
/// bucket settings with a reply the client cannot even parse.
pub const MIN_SERVER: (u32, u32) = (2, 11);

/// Whether a server reporting `version` (`2.15.1`, `2.11.0-RC.2`) is new
/// enough; a version that does not parse is given the benefit of the doubt.
pub fn server_supported(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_SERVER,
        _ => true,
    }
}

/// Tries once: for CLI commands, which report and exit.
pub async fn connect_once(
    config: &ConnectConfig,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let addrs = config.server_addrs()?;
    let options = options(config, name).await?;
    let client = options.connect(addrs).await.map_err(|source| {
        let servers = config.servers_for_log();
        let method = config.auth.describe();
        match source.kind() {
            kind @ (async_nats::ConnectErrorKind::AuthorizationViolation
            | async_nats::ConnectErrorKind::Authentication
            | async_nats::ConnectErrorKind::Tls) => ConnectError::Refused {
                servers,
                method,
                kind,
            },
            _ => ConnectError::Unreachable {
                servers,
                method,
                source,
            },
        }
    })?;
    let version = client.server_info().version;
    if !server_supported(&version) {
        return Err(ConnectError::ServerTooOld {
            servers: config.servers_for_log(),
            version,
        });
    }
    Ok(client)
}

/// Connects to NATS, retrying until it succeeds or `give_up` fires
/// (`Ok(None)`). Services start in any order in a compose stack, so a missing
/// server at start-up is a wait, not a crash; refused credentials or TLS are
/// not going to fix themselves, so they fail at once.
pub async fn connect(
    config: &ConnectConfig,
    name: &str,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<Option<async_nats::Client>, ConnectError> {
    tokio::pin!(give_up);
    let mut delay = Duration::from_millis(100);
    loop {
        match connect_once(config, name).await {
            Ok(client) => return Ok(Some(client)),
            Err(err @ ConnectError::Unreachable { .. }) => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot connect to nats");
            }
            Err(err) => return Err(err),
        }
        tokio::select! {
            _ = &mut give_up => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn options(
    config: &ConnectConfig,
    name: &str,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let servers = config.servers_for_log();
    let method = config.auth.describe();
    let client = name.to_owned();
    let options = config
        .options(name)
        .await
        .map_err(|source| ConnectError::Credentials {
            method: method.clone(),
            source,
        })?;
    Ok(options.event_callback(move |event| {
        let (servers, method, client) = (servers.clone(), method.clone(), client.clone());
        async move { log_event(&client, &servers, &method, event) }
    }))
}

/// Denials come only through this callback, long after the call that caused
/// them: log the subject (and count it) so an operator can fix permissions.
fn log_event(client: &str, servers: &str, method: &str, event: async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::Connected => tracing::info!(client, %servers, "nats connected"),
        Event::Disconnected => tracing::warn!(client, %servers, "nats disconnected"),
        Event::ServerError(ServerError::AuthorizationViolation) => {
            tracing::error!(client, %servers, method, "nats refused the credentials (authorization violation)")
        }
        Event::ServerError(ServerError::Other(message)) => match parse_denial(&message) {
            Some(denial) => {
                metrics::counter!(
                    "pushbus_nats_permission_denied_total",
                    "client" => client.to_owned(),
                    "operation" => denial.operation.clone(),
                    "subject" => denial.subject.clone(),
                )
                .increment(1);
                tracing::error!(
                    client,
                    operation = %denial.operation,
                    subject = %denial.subject,
                    "nats permissions violation: {} on {:?} denied to this user",
                    denial.operation,
                    denial.subject
                );
            }
            None => tracing::warn!(client, error = %message, "nats server error"),
        },
        other => tracing::info!(client, event = %other, "nats event"),
    }
}

#[cfg(test)]
mod tests {
    use super::server_supported;

    #[test]
    fn servers_older_than_2_11_are_refused() {
        for old in ["2.9.10", "2.10.24", "1.4.1", "2.10.0-beta.1"] {
            assert!(!server_supported(old), "{old}");
        }
        for new in [
            "2.11.0",
            "2.11.0-RC.2",
            "2.15.1",
            "3.0.0",
            "10.1.2",
            "",
            "unknown",
        ] {
            assert!(server_supported(new), "{new}");
        }
    }
}
