//! Stored messages as an operator reads them: the envelope and its payload
//! decoded to JSON (what `nats stream view` shows as protobuf bytes).

use async_nats::HeaderMap;
use prost::{Message, Name};
use pushbus_shared::names::headers;
use pushbus_shared::proto::{
    AgentPoke, Envelope, GitPushEvent, RefChange, RefHead, ReplicationStatus, change_kind_name,
    ref_kind_name,
};
use serde_json::{Value, json};

/// One stored message: where it is, its envelope, its payload, and the
/// dead-letter annotations when it has them.
pub fn message(
    stream: &str,
    sequence: u64,
    subject: &str,
    time: Option<String>,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Value {
    let mut out = json!({
        "stream": stream,
        "sequence": sequence,
        "subject": subject,
        "time": time,
    });
    if stream == pushbus_shared::names::STREAM_REF_HEADS {
        ref_head(&mut out, headers, payload);
        return out;
    }
    match pushbus_shared::envelope::decode(payload) {
        Ok(env) => {
            out["event_id"] = json!(env.event_id);
            out["correlation_id"] = json!(env.correlation_id);
            out["causation_id"] = json!(env.causation_id);
            out["type"] = json!(env.type_url.rsplit('/').next().unwrap_or_default());
            out["source"] = json!(
                env.source
                    .as_ref()
                    .map(|s| format!("{}@{}", s.service, s.instance))
            );
            out["traceparent"] = json!(env.trace.as_ref().map(|t| t.traceparent.clone()));
            out["payload"] = payload_json(&env);
        }
        Err(err) => out["undecodable"] = json!(err.to_string()),
    }
    if let Some(h) = headers
        && h.get(headers::DLQ_REASON).is_some()
    {
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
        out["dead_letter"] = json!({
            "reason": get(headers::DLQ_REASON),
            "consumer": get(headers::DLQ_CONSUMER),
            "stream": get(headers::DLQ_STREAM),
            "subject": get(headers::DLQ_SUBJECT),
            "sequence": get(headers::DLQ_SEQUENCE).and_then(|s| s.parse::<u64>().ok()),
            "delivered": get(headers::DLQ_DELIVERED).and_then(|s| s.parse::<u64>().ok()),
        });
    }
    out
}

/// A ref head is a plain `RefHead` (no envelope); a removal is an empty
/// message whose headers say why.
fn ref_head(out: &mut Value, headers: Option<&HeaderMap>, payload: &[u8]) {
    if let Some(why) = pushbus_shared::heads::removal(headers) {
        out["type"] = json!("removed");
        out["removed"] = json!(why);
        return;
    }
    match RefHead::decode(payload) {
        Ok(head) => {
            out["event_id"] = json!(head.event_id);
            out["correlation_id"] = json!(head.correlation_id);
            // What the envelope's causation ID says elsewhere: the push.
            out["causation_id"] = json!(head.poke.as_ref().map(|p| p.push_event_id.clone()));
            out["type"] = json!(RefHead::full_name());
            out["traceparent"] = json!(head.trace.as_ref().map(|t| t.traceparent.clone()));
            out["payload"] = head.poke.as_ref().map_or(Value::Null, poke);
        }
        Err(err) => out["undecodable"] = json!(err.to_string()),
    }
}

fn payload_json(env: &Envelope) -> Value {
    let t = env.type_url.as_str();
    let bytes = env.payload.as_slice();
    let decoded = if t == GitPushEvent::type_url() {
        GitPushEvent::decode(bytes).map(|p| push(&p))
    } else if t == AgentPoke::type_url() {
        AgentPoke::decode(bytes).map(|p| poke(&p))
    } else if t == ReplicationStatus::type_url() {
        ReplicationStatus::decode(bytes).map(|s| {
            json!({
                "node_id": s.node_id,
                "applied_sequence": s.applied_sequence,
                "db_lag_seconds": s.db_lag_seconds,
                "project_applied_sequences": s.project_applied_sequences,
            })
        })
    } else {
        return json!({ "bytes": bytes.len() });
    };
    decoded.unwrap_or_else(|e| json!({ "undecodable": e.to_string() }))
}

fn push(p: &GitPushEvent) -> Value {
    json!({
        "project_id": p.project_id,
        "project_path": p.project_path,
        "actor": p.actor,
        "protocol": p.protocol,
        "default_branch": p.default_branch,
        "geo_node_id": p.geo_node_id,
        "push_options": p.push_options,
        "part": p.part,
        "part_count": p.part_count,
        "changes": p.changes.iter().map(change).collect::<Vec<_>>(),
    })
}

fn change(c: &RefChange) -> Value {
    json!({
        "ref": c.r#ref,
        "old_sha": c.old_sha,
        "new_sha": c.new_sha,
        "ref_kind": ref_kind_name(c.ref_kind),
        "change": change_kind_name(c.change_kind),
        "forced": c.forced,
        "changed_paths": c.changed_paths,
    })
}

fn poke(p: &AgentPoke) -> Value {
    json!({
        "agent_id": p.agent_id,
        "project_id": p.project_id,
        "project_path": p.project_path,
        "ref": p.r#ref,
        "ref_kind": ref_kind_name(p.ref_kind),
        "change": change_kind_name(p.change_kind),
        "forced": p.forced,
        "old_sha": p.old_sha,
        "new_sha": p.new_sha,
        "push_event_id": p.push_event_id,
        "push_sequence": p.push_sequence,
        "changed_paths": p.changed_paths,
        "actor": p.actor,
    })
}

/// The one-line human form of [`message`].
pub fn line(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    let p = &v["payload"];
    let what = match v["type"].as_str() {
        Some("pushbus.v1.GitPushEvent") => {
            let refs: Vec<String> = p["changes"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            format!(
                                "{} {}",
                                c["ref"].as_str().unwrap_or(""),
                                short(c["new_sha"].as_str().unwrap_or(""))
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("push project {} {}", p["project_id"], refs.join(", "))
        }
        Some("pushbus.v1.AgentPoke" | "pushbus.v1.RefHead") => format!(
            "poke agent {} {} {}",
            p["agent_id"].as_str().unwrap_or(""),
            p["ref"].as_str().unwrap_or(""),
            short(p["new_sha"].as_str().unwrap_or(""))
        ),
        Some("removed") => format!("removed ({})", s("removed")),
        Some(t) => t.to_owned(),
        None => "undecodable".to_owned(),
    };
    let mut out = format!(
        "{} #{} {} {} event={} correlation={}",
        s("time"),
        v["sequence"],
        s("subject"),
        what,
        s("event_id"),
        s("correlation_id"),
    );
    if let Some(dl) = v.get("dead_letter") {
        out.push_str(&format!(
            " | dead-lettered by {} after {} deliveries: {}",
            dl["consumer"].as_str().unwrap_or("-"),
            dl["delivered"],
            dl["reason"].as_str().unwrap_or("-")
        ));
    }
    out
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// RFC 3339, for message times.
pub fn rfc3339(t: time::OffsetDateTime) -> Option<String> {
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}
