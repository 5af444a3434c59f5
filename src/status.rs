//! `pushbus status`: streams and consumers with their backlog, dead letters
//! per consumer, and what every running service instance says of itself
//! (agents connected, readiness, last error), gathered over NATS micro.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;
use pushbus_shared::names;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// How long to wait for service instances to answer.
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
    #[arg(long)]
    json: bool,
}

const STREAMS: &[&str] = &[
    names::STREAM_PUSHES,
    names::STREAM_REF_HEADS,
    names::STREAM_WEBHOOKS,
    names::STREAM_DLQ,
    names::STREAM_GEO_STATUS,
];

const SERVICES: &[&str] = &[
    "hook-ingest",
    "filter",
    "gitops-notifier",
    "replication-lag",
];

pub async fn run(client: async_nats::Client, args: StatusArgs) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let mut streams = Vec::new();
    for name in STREAMS {
        let Ok(mut stream) = js.get_stream(*name).await else {
            streams.push(json!({ "stream": name, "missing": true }));
            continue;
        };
        let info = stream.info().await?.clone();
        let mut consumers = Vec::new();
        let mut listed = stream.consumers();
        while let Some(c) = listed.next().await {
            let c = c?;
            consumers.push(json!({
                "consumer": c.name,
                "pending": c.num_pending,
                "ack_pending": c.num_ack_pending,
                "redelivered": c.num_redelivered,
                "waiting": c.num_waiting,
            }));
        }
        streams.push(json!({
            "stream": name,
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "first_sequence": info.state.first_sequence,
            "last_sequence": info.state.last_sequence,
            "replicas": info.config.num_replicas,
            "consumers": consumers,
        }));
    }
    let mut dead_letters = serde_json::Map::new();
    if let Ok(dlq) = js.get_stream(names::STREAM_DLQ).await
        && let Ok(mut subjects) = dlq.info_with_subjects(names::SUBJECTS_DLQ).await
    {
        while let Some(Ok((subject, n))) = subjects.next().await {
            let consumer = subject.rsplit('.').next().unwrap_or_default().to_owned();
            dead_letters.insert(consumer, json!(n));
        }
    }
    let wait = Duration::from_millis(args.wait_ms);
    let mut instances = Vec::new();
    for service in SERVICES {
        instances.extend(gather(&client, &names::status_subject(service), wait).await?);
    }
    let report = json!({
        "streams": streams,
        "dead_letters": dead_letters,
        "instances": instances,
    });
    if args.json {
        println!("{report}");
    } else {
        print_human(&report);
    }
    Ok(())
}

/// Every reply to `subject` within `wait`: each instance answers.
async fn gather(
    client: &async_nats::Client,
    subject: &str,
    wait: Duration,
) -> anyhow::Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .context("asking the services")?;
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(wait, replies.next()).await {
        if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
            out.push(v);
        }
    }
    Ok(out)
}

fn print_human(r: &Value) {
    println!("streams:");
    for s in r["streams"].as_array().into_iter().flatten() {
        if s["missing"] == true {
            println!(
                "  {:<18} missing (run `pushbus setup`)",
                s["stream"].as_str().unwrap_or("")
            );
            continue;
        }
        println!(
            "  {:<18} {} messages, {} bytes, R{}",
            s["stream"].as_str().unwrap_or(""),
            s["messages"],
            s["bytes"],
            s["replicas"]
        );
        for c in s["consumers"].as_array().into_iter().flatten() {
            println!(
                "    consumer {:<26} pending {} ack pending {} redelivered {} waiting {}",
                c["consumer"].as_str().unwrap_or(""),
                c["pending"],
                c["ack_pending"],
                c["redelivered"],
                c["waiting"]
            );
        }
    }
    println!("dead letters:");
    match r["dead_letters"].as_object() {
        Some(m) if !m.is_empty() => {
            for (consumer, n) in m {
                println!("  {consumer:<26} {n} (pushbus dlq list --consumer {consumer})");
            }
        }
        _ => println!("  none"),
    }
    println!("service instances:");
    let instances = r["instances"].as_array().cloned().unwrap_or_default();
    if instances.is_empty() {
        println!("  none answered");
    }
    for i in instances {
        let gauges = i["gauges"]
            .as_object()
            .map(|g| {
                g.iter()
                    .map(|(k, v)| format!("{}={v}", k.trim_start_matches("pushbus_")))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        println!(
            "  {:<16} {:<28} {} {}",
            i["service"].as_str().unwrap_or(""),
            i["instance"].as_str().unwrap_or(""),
            if i["ready"] == true {
                "ready"
            } else {
                "NOT READY"
            },
            gauges
        );
        if let Some(e) = i["last_error"].as_object() {
            println!(
                "    last error at {}: {}",
                e["at"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            );
        }
    }
}
