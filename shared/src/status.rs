//! Each running service instance answers NATS micro discovery as
//! `pushbus-<service>` with one endpoint, `pushbus.status.<service>`, whose
//! stats carry what `pushbus status` shows: readiness, the process's
//! gauges (agents connected, …) and its last error.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::ops::Readiness;

static LAST_ERROR: Mutex<Option<(String, String)>> = Mutex::new(None);

/// Remembers the last error this process logged (time, message), for
/// `pushbus status`.
pub fn record_error(message: String) {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, message));
}

/// What this instance says about itself.
pub fn snapshot(service: &str, readiness: &Readiness) -> serde_json::Value {
    let last_error = LAST_ERROR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .map(|(at, message)| serde_json::json!({ "at": at, "message": message }));
    let waiting = readiness.waiting_for();
    serde_json::json!({
        "service": service,
        "instance": crate::service::instance_id(),
        "ready": waiting.is_empty(),
        "waiting_for": waiting,
        "gauges": gauges(),
        "last_error": last_error,
    })
}

/// The process's unlabelled pushbus gauges, read from its own /metrics.
fn gauges() -> serde_json::Map<String, serde_json::Value> {
    let text = crate::ops::metrics_handle().render();
    let mut out = serde_json::Map::new();
    for (name, kind, _) in crate::ops::METRICS {
        if *kind != crate::ops::Kind::Gauge {
            continue;
        }
        let value = text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
            rest.trim().parse::<f64>().ok()
        });
        if let Some(v) = value {
            out.insert((*name).to_owned(), serde_json::json!(v));
        }
    }
    out
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
