//! `pushbus events tail`: follows the streams and prints every message
//! decoded, as `nats sub` would if it read protobuf envelopes.

use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use pushbus_shared::names;

use crate::show;

#[derive(clap::Args)]
pub struct TailArgs {
    /// Subjects to follow (wildcards allowed), e.g. `pushbus.push.42.*`, or
    /// `pushbus.poke.agent-1` for that agent's ref heads (the pokes it is
    /// sent; `$KV.pushbus-ref-heads.agent-1.>` says the same). Default: every
    /// push, ref head and webhook job.
    subjects: Vec<String>,
    /// Start from here instead of from now: a stream sequence (`1` is the
    /// beginning), an RFC 3339 time, or an age such as `90s`, `10m`, `2h`, `1d`.
    #[arg(long)]
    since: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// The stream a subject belongs to, and the subject in that stream
/// (`pushbus.poke.<agent>` names the agent's ref heads).
fn stream_of(subject: &str) -> Option<(String, String)> {
    let heads = names::STREAM_REF_HEADS.to_owned();
    let heads_prefix = format!("$KV.{}.", names::BUCKET_REF_HEADS);
    let family: Vec<&str> = subject.splitn(4, '.').collect();
    let stream = match family.as_slice() {
        ["pushbus", "push", ..] => names::STREAM_PUSHES,
        ["pushbus", "poke", agent] if *agent == ">" => {
            return Some((heads, format!("{heads_prefix}>")));
        }
        ["pushbus", "poke", agent] => return Some((heads, format!("{heads_prefix}{agent}.>"))),
        _ if subject.starts_with(&heads_prefix) => return Some((heads, subject.to_owned())),
        ["pushbus", "webhook", ..] => names::STREAM_WEBHOOKS,
        ["pushbus", "dlq", ..] => names::STREAM_DLQ,
        ["pushbus", "geo", "status", ..] => names::STREAM_GEO_STATUS,
        _ => return None,
    };
    Some((stream.to_owned(), subject.to_owned()))
}

fn deliver_policy(since: Option<&str>) -> anyhow::Result<DeliverPolicy> {
    let Some(since) = since else {
        return Ok(DeliverPolicy::New);
    };
    if let Ok(start_sequence) = since.parse::<u64>() {
        return Ok(DeliverPolicy::ByStartSequence { start_sequence });
    }
    let age = since
        .strip_suffix('s')
        .map(|n| (n, 1))
        .or_else(|| since.strip_suffix('m').map(|n| (n, 60)))
        .or_else(|| since.strip_suffix('h').map(|n| (n, 3600)))
        .or_else(|| since.strip_suffix('d').map(|n| (n, 86_400)))
        .and_then(|(n, unit)| n.parse::<u64>().ok().map(|n| n * unit));
    let start_time = match age {
        Some(secs) => time::OffsetDateTime::now_utc() - Duration::from_secs(secs),
        None => time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
                format!(
                    "--since {since:?}: expected a sequence, an RFC 3339 time or an age like 10m"
                )
            })?,
    };
    Ok(DeliverPolicy::ByStartTime { start_time })
}

pub async fn tail(js: jetstream::Context, args: TailArgs) -> anyhow::Result<()> {
    let subjects = if args.subjects.is_empty() {
        vec![
            names::SUBJECTS_PUSHES.to_owned(),
            "pushbus.poke.>".to_owned(),
            names::SUBJECTS_WEBHOOKS.to_owned(),
        ]
    } else {
        args.subjects.clone()
    };
    let mut by_stream: Vec<(String, Vec<String>)> = Vec::new();
    for s in subjects {
        let Some((stream, subject)) = stream_of(&s) else {
            bail!(
                "{s}: not a pushbus subject (pushbus.push.…, pushbus.poke.…, $KV.pushbus-ref-heads.…, pushbus.webhook.…, pushbus.dlq.…, pushbus.geo.status.…)"
            );
        };
        match by_stream.iter_mut().find(|(n, _)| *n == stream) {
            Some((_, list)) => list.push(subject),
            None => by_stream.push((stream, vec![subject])),
        }
    }
    let policy = deliver_policy(args.since.as_deref())?;
    let mut feeds = Vec::new();
    for (name, filter_subjects) in by_stream {
        let stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("opening {name}"))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subjects,
                deliver_policy: policy,
                ..Default::default()
            })
            .await
            .with_context(|| format!("following {name}"))?;
        let name: std::sync::Arc<str> = name.into();
        feeds.push(
            consumer
                .messages()
                .await?
                .map(move |m| (name.clone(), m))
                .boxed(),
        );
    }
    let mut all = futures::stream::select_all(feeds);
    let mut shown = 0;
    while args.count.is_none_or(|c| shown < c) {
        let next = tokio::select! {
            next = all.next() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some((stream, message)) = next else { break };
        let m = message?;
        let Ok(info) = m.info() else { continue };
        let v = show::message(
            &stream,
            info.stream_sequence,
            m.subject.as_str(),
            show::rfc3339(info.published),
            m.headers.as_ref(),
            &m.payload,
        );
        if args.json {
            println!("{v}");
        } else {
            println!("{}", show::line(&v));
        }
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poke_subjects_name_the_agents_ref_heads() {
        let heads = |s: &str| Some((names::STREAM_REF_HEADS.to_owned(), s.to_owned()));
        assert_eq!(
            stream_of("pushbus.poke.agent-1"),
            heads("$KV.pushbus-ref-heads.agent-1.>")
        );
        assert_eq!(
            stream_of("pushbus.poke.>"),
            heads("$KV.pushbus-ref-heads.>")
        );
        assert_eq!(
            stream_of("$KV.pushbus-ref-heads.a.1.6d"),
            heads("$KV.pushbus-ref-heads.a.1.6d")
        );
        assert_eq!(
            stream_of("pushbus.push.42.*"),
            Some((
                names::STREAM_PUSHES.to_owned(),
                "pushbus.push.42.*".to_owned()
            ))
        );
        assert_eq!(stream_of("$KV.pushbus-agents.a"), None);
        assert_eq!(stream_of("other.subject"), None);
    }

    #[test]
    fn since_takes_a_sequence_an_age_or_an_rfc3339_time() {
        let start = |since: &str| match deliver_policy(Some(since)).unwrap() {
            DeliverPolicy::ByStartTime { start_time } => start_time,
            other => panic!("{since}: {other:?}"),
        };
        assert!(matches!(deliver_policy(None).unwrap(), DeliverPolicy::New));
        assert!(matches!(
            deliver_policy(Some("42")).unwrap(),
            DeliverPolicy::ByStartSequence { start_sequence: 42 }
        ));
        for (age, secs) in [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86_400)] {
            let ago = time::OffsetDateTime::now_utc() - start(age);
            let off = ago - time::Duration::seconds(secs);
            assert!(off.abs() < time::Duration::seconds(5), "{age}: {ago}");
        }
        let at = start("2026-01-02T03:04:05Z");
        assert_eq!(at.unix_timestamp(), 1_767_323_045);
        for bad in ["yesterday", "10x", "-5m", ""] {
            let e = deliver_policy(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("--since"), "{bad}: {e}");
        }
    }
}
