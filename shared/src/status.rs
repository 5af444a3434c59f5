//! Each running service instance answers NATS micro discovery as
//! `pushbus-<service>` with one endpoint, `pushbus.status.<service>`, whose
//! stats carry what `pushbus status` shows: readiness, the service's
//! gauges (agents connected, …) and its last error.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::ops::Readiness;

/// The last error logged by each service of this process, and by code no
/// service owns (`None`: shared code that logged without a `service` field).
static LAST_ERRORS: Mutex<Vec<(Option<String>, LastError)>> = Mutex::new(Vec::new());

#[derive(Clone)]
struct LastError {
    at: time::OffsetDateTime,
    message: String,
}

/// Fields of a log event that say whose it is: `service` names the
/// service, `client` its NATS client (`pushbus-filter`), `consumer` its
/// durable consumer (`filter`, `gitops-notifier-webhooks`).
pub const WHOSE_FIELDS: [&str; 3] = ["service", "client", "consumer"];

/// Remembers the last error this process logged for `pushbus status`, as
/// the error of the service its fields (`WHOSE_FIELDS`) or else its crate
/// (`pushbus_filter::…`) name; shared code's is nobody's.
pub fn record_error(target: &str, whose: &[(&str, String)], message: String) {
    let owner = whose
        .iter()
        .find_map(|(field, value)| service_named(field, value))
        .or_else(|| service_of_target(target));
    let error = LastError {
        at: time::OffsetDateTime::now_utc(),
        message,
    };
    let mut errors = LAST_ERRORS.lock().unwrap_or_else(|e| e.into_inner());
    match errors.iter_mut().find(|(o, _)| *o == owner) {
        Some((_, last)) => *last = error,
        None => errors.push((owner, error)),
    }
}

const SERVICES: [&str; 4] = [
    crate::names::SERVICE_HOOK_INGEST,
    crate::names::SERVICE_FILTER,
    crate::names::SERVICE_GITOPS_NOTIFIER,
    crate::names::SERVICE_REPLICATION_LAG,
];

/// The service a `WHOSE_FIELDS` field names, if any.
fn service_named(field: &str, value: &str) -> Option<String> {
    let named = |s: &&str| match field {
        "service" => value == *s,
        "client" => value.strip_prefix("pushbus-") == Some(*s),
        // Durable consumers are named for their service: `filter`,
        // `gitops-notifier-webhooks`.
        _ => value
            .strip_prefix(*s)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-')),
    };
    SERVICES.into_iter().find(named).map(str::to_owned)
}

/// The service whose crate `target` (a module path) is in, if any.
fn service_of_target(target: &str) -> Option<String> {
    let krate = target.split("::").next()?;
    SERVICES
        .into_iter()
        .find(|s| krate.strip_prefix("pushbus_") == Some(&s.replace('-', "_")))
        .map(str::to_owned)
}

/// `service`'s last error: its own, or shared code's if that is newer
/// (in a process hosting several services, shared code's is every one's).
fn last_error(service: &str) -> Option<LastError> {
    let errors = LAST_ERRORS.lock().unwrap_or_else(|e| e.into_inner());
    errors
        .iter()
        .filter(|(owner, _)| owner.as_deref().is_none_or(|o| o == service))
        .map(|(_, e)| e)
        .max_by_key(|e| e.at)
        .cloned()
}

/// What this instance says about itself.
pub fn snapshot(service: &str, readiness: &Readiness) -> serde_json::Value {
    let last_error = last_error(service).map(|e| {
        let at =
            e.at.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
        serde_json::json!({ "at": at, "message": e.message })
    });
    let waiting = readiness.waiting_for();
    serde_json::json!({
        "service": service,
        "instance": crate::service::instance_id(),
        "ready": waiting.is_empty(),
        "waiting_for": waiting,
        "gauges": gauges(service),
        "last_error": last_error,
    })
}

/// The service's own unlabelled gauges, read from its process's /metrics.
/// Only its own: `pushbus run all` hosts every service in one process, and
/// hook-ingest does not hold filter's registry.
fn gauges(service: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = crate::ops::metrics_handle().render();
    let mut out = serde_json::Map::new();
    for (name, kind, _) in crate::ops::METRICS {
        if *kind != crate::ops::Kind::Gauge || !gauge_of(service, name) {
            continue;
        }
        let value = text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
            rest.trim().parse::<f64>().ok()
        });
        if let Some(v) = value {
            out.insert((*name).to_owned(), count_or_number(v));
        }
    }
    out
}

/// Whether an unlabelled gauge is `service`'s: its name says whose it is
/// (`pushbus_filter_…`, `pushbus_notifier_…`), as its flags' prefix does.
fn gauge_of(service: &str, gauge: &str) -> bool {
    use crate::names::{
        SERVICE_FILTER, SERVICE_GITOPS_NOTIFIER, SERVICE_HOOK_INGEST, SERVICE_REPLICATION_LAG,
    };
    let own = match service {
        SERVICE_HOOK_INGEST => "pushbus_ingest_",
        SERVICE_FILTER => "pushbus_filter_",
        SERVICE_GITOPS_NOTIFIER => "pushbus_notifier_",
        SERVICE_REPLICATION_LAG => "pushbus_lag_",
        _ => return false,
    };
    gauge.starts_with(own)
}

/// Every gauge pushbus exports counts something, so a whole value is shown
/// as one (`connections=3`, not `3.0`).
fn count_or_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 2f64.powi(53) {
        serde_json::json!(v as i64)
    } else {
        serde_json::json!(v)
    }
}

/// Serves `pushbus-<service>` until `stop`. Each instance is its own queue
/// group, so a request to `pushbus.status.<service>` reaches every instance.
pub async fn announce(
    client: async_nats::Client,
    service: &'static str,
    readiness: Readiness,
    stop: CancellationToken,
) {
    use async_nats::service::ServiceExt;
    use futures::StreamExt;
    let stats_readiness = readiness.clone();
    let started = client
        .service_builder()
        .description(format!("pushbus {service}: status of this instance"))
        .queue_group(crate::service::instance_id())
        .stats_handler(move |_, _| snapshot(service, &stats_readiness))
        .start(format!("pushbus-{service}"), env!("CARGO_PKG_VERSION"))
        .await;
    let service_handle = match started {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(error = %err, "cannot announce this instance on NATS micro");
            return;
        }
    };
    let endpoint = service_handle
        .endpoint_builder()
        .name("status")
        .add(crate::names::status_subject(service))
        .await;
    let mut requests = match endpoint {
        Ok(e) => e,
        Err(err) => {
            tracing::warn!(error = %err, "cannot serve the status endpoint");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => break,
            r = requests.next() => match r { Some(r) => r, None => break },
        };
        let body = snapshot(service, &readiness).to_string();
        if let Err(err) = request.respond(Ok(body.into())).await {
            tracing::debug!(error = %err, "status reply failed");
        }
    }
    drop(requests);
    let _ = service_handle.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    // One process hosting several services (`pushbus run all`): each shows
    // its own last error, and shared code's (owner unknown) to all of them.
    #[test]
    fn each_service_shows_its_own_last_error() {
        let none: &[(&str, String)] = &[];
        record_error("pushbus_filter::registry", none, "filter broke".into());
        record_error(
            "pushbus_shared::service::host",
            &[("service", "gitops-notifier".into())],
            "notifier failed".into(),
        );
        record_error(
            "pushbus_shared::bus",
            &[("client", "pushbus-replication-lag".into())],
            "lag refused".into(),
        );
        let message = |s: &str| last_error(s).map(|e| e.message);
        assert_eq!(message("filter").as_deref(), Some("filter broke"));
        assert_eq!(
            message("gitops-notifier").as_deref(),
            Some("notifier failed")
        );
        assert_eq!(message("replication-lag").as_deref(), Some("lag refused"));
        assert_eq!(message("hook-ingest"), None);
        record_error("pushbus_shared::bus", none, "bus lost".into());
        assert_eq!(message("hook-ingest").as_deref(), Some("bus lost"));
        assert_eq!(message("filter").as_deref(), Some("bus lost"));
    }

    #[test]
    fn fields_and_crates_name_their_service() {
        let named = |f: &str, v: &str| service_named(f, v);
        assert_eq!(named("consumer", "filter").as_deref(), Some("filter"));
        assert_eq!(
            named("consumer", "gitops-notifier-webhooks").as_deref(),
            Some("gitops-notifier")
        );
        assert_eq!(named("consumer", "filterx"), None);
        assert_eq!(
            named("client", "pushbus-hook-ingest").as_deref(),
            Some("hook-ingest")
        );
        assert_eq!(named("client", "hook-ingest"), None);
        assert_eq!(named("service", "nosuch"), None);
        assert_eq!(
            service_of_target("pushbus_replication_lag::lag").as_deref(),
            Some("replication-lag")
        );
        assert_eq!(
            service_of_target("pushbus_hook_ingest").as_deref(),
            Some("hook-ingest")
        );
        assert_eq!(service_of_target("pushbus_shared::bus"), None);
        assert_eq!(service_of_target("async_nats"), None);
    }

    #[test]
    fn whole_gauges_are_counts() {
        assert_eq!(count_or_number(3.0), serde_json::json!(3));
        assert_eq!(count_or_number(0.5), serde_json::json!(0.5));
    }
}
