//! `pushbus dlq`: what died in `PUSHBUS_DLQ`, why, and sending it back.

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, stream::Stream};
use futures::StreamExt;
use pushbus_shared::names::{self, headers};

use crate::show;

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// Every dead letter: why it died, how often it was tried, where from.
    List {
        /// Only those of this consumer (filter, gitops-notifier, …).
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, decoded, by its PUSHBUS_DLQ sequence.
    Show {
        sequence: u64,
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again to their original subjects (same event and
    /// correlation IDs) and remove them from the DLQ.
    Replay {
        sequences: Vec<u64>,
        /// Every dead letter (of `--consumer`, if given).
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good.
    Purge {
        /// Only those of this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(js: jetstream::Context, command: DlqCommand) -> anyhow::Result<()> {
    let stream = js
        .get_stream(names::STREAM_DLQ)
        .await
        .context("opening PUSHBUS_DLQ (run `pushbus setup` first?)")?;
    match command {
        DlqCommand::List { consumer, json } => {
            for letter in letters(&stream, consumer.as_deref()).await? {
                print(&letter.shown, json);
            }
        }
        DlqCommand::Show { sequence, json } => {
            let letter = letter(&stream, sequence).await?;
            if json {
                println!("{}", letter.shown);
            } else {
                println!("{}", serde_json::to_string_pretty(&letter.shown)?);
            }
        }
        DlqCommand::Replay {
            sequences,
            all,
            consumer,
            json,
        } => {
            let chosen = if all {
                letters(&stream, consumer.as_deref()).await?
            } else if sequences.is_empty() {
                bail!("name the dead letters to replay (their sequences) or give --all");
            } else {
                let mut chosen = Vec::new();
                for s in sequences {
                    chosen.push(letter(&stream, s).await?);
                }
                chosen
            };
            for l in chosen {
                let replayed = replay(&js, &stream, &l).await?;
                print(&replayed, json);
            }
        }
        DlqCommand::Purge { consumer, yes } => {
            if !yes {
                bail!("purging dead letters cannot be undone: add --yes");
            }
            let mut purge = stream.purge();
            if let Some(c) = &consumer {
                purge = purge.filter(names::dlq_subject(c));
            }
            let purged = purge.await?.purged;
            eprintln!("purged {purged} dead letters");
        }
    }
    Ok(())
}

fn print(v: &serde_json::Value, json: bool) {
    if json {
        println!("{v}");
    } else {
        println!("{}", show::line(v));
    }
}

struct Letter {
    sequence: u64,
    headers: HeaderMap,
    payload: bytes::Bytes,
    shown: serde_json::Value,
}

fn to_letter(
    sequence: u64,
    subject: &str,
    time: Option<String>,
    headers: Option<HeaderMap>,
    payload: bytes::Bytes,
) -> Letter {
    let shown = show::message(
        names::STREAM_DLQ,
        sequence,
        subject,
        time,
        headers.as_ref(),
        &payload,
    );
    Letter {
        sequence,
        headers: headers.unwrap_or_default(),
        payload,
        shown,
    }
}

async fn letter(stream: &Stream, sequence: u64) -> anyhow::Result<Letter> {
    let m = stream
        .get_raw_message(sequence)
        .await
        .with_context(|| format!("no dead letter #{sequence}"))?;
    Ok(to_letter(
        m.sequence,
        m.subject.as_str(),
        show::rfc3339(m.time),
        Some(m.headers),
        m.payload,
    ))
}

async fn letters(stream: &Stream, consumer: Option<&str>) -> anyhow::Result<Vec<Letter>> {
    let filter = consumer.map_or_else(|| names::SUBJECTS_DLQ.to_owned(), names::dlq_subject);
    let mut info = stream.clone();
    let total = info.info().await?.state.messages;
    if total == 0 {
        return Ok(Vec::new());
    }
    let ordered = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await?;
    let pending = ordered.cached_info().num_pending as usize;
    let mut messages = ordered.messages().await?.take(pending);
    let mut out = Vec::with_capacity(pending);
    while let Some(m) = messages.next().await {
        let m = m?;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (sequence, time) = (info.stream_sequence, show::rfc3339(info.published));
        out.push(to_letter(
            sequence,
            m.subject.as_str(),
            time,
            m.headers.clone(),
            m.payload.clone(),
        ));
    }
    Ok(out)
}

/// Publishes the dead letter's original message again on its original
/// subject, keeping its envelope (event, correlation and causation IDs), and
/// removes it from the DLQ once the stream acked it. The new copy carries
/// `Pushbus-Replay-Of` (the DLQ sequence) and `Pushbus-Replay-Sequence`
/// (where the original stood, so a replayed push orders as the push it
/// was, not as a new one); its `Nats-Msg-Id` differs from the original's so
/// the duplicate window does not drop it, and it is published without the
/// original's `Nats-Expected-*` conditions.
async fn replay(
    js: &jetstream::Context,
    stream: &Stream,
    l: &Letter,
) -> anyhow::Result<serde_json::Value> {
    let get = |k: &str| l.headers.get(k).map(|v| v.as_str().to_owned());
    let Some(subject) = get(headers::DLQ_SUBJECT) else {
        bail!("dead letter #{} names no original subject", l.sequence);
    };
    let mut out = HeaderMap::new();
    for (name, values) in l.headers.iter() {
        let name: &str = name.as_ref();
        // The original's publish conditions held for the original only: a
        // push's "nothing on this subject yet" would refuse every replay
        // while the original is kept.
        if name.starts_with("Pushbus-Dlq-")
            || name == headers::MSG_ID
            || name.starts_with("Nats-Expected-")
        {
            continue;
        }
        for v in values {
            out.append(name, v.as_str());
        }
    }
    out.insert(headers::REPLAY_OF, l.sequence.to_string().as_str());
    if let Some(seq) = get(headers::DLQ_SEQUENCE) {
        out.insert(headers::REPLAY_SEQUENCE, seq.as_str());
    }
    let event_id = l.shown["event_id"].as_str().unwrap_or("unknown");
    let publish = jetstream::message::PublishMessage::build()
        .headers(out)
        .message_id(format!("{event_id}:replay:{}", l.sequence))
        .payload(l.payload.clone());
    let ack = js
        .send_publish(subject.clone(), publish)
        .await?
        .await
        .with_context(|| format!("replaying dead letter #{} to {subject}", l.sequence))?;
    stream
        .delete_message(l.sequence)
        .await
        .with_context(|| format!("replayed, but cannot remove dead letter #{}", l.sequence))?;
    let mut shown = l.shown.clone();
    shown["replayed_to"] = serde_json::json!({
        "stream": ack.stream,
        "sequence": ack.sequence,
        "subject": subject,
    });
    eprintln!(
        "replayed dead letter #{} to {subject} ({} #{}) and removed it from PUSHBUS_DLQ",
        l.sequence, ack.stream, ack.sequence
    );
    Ok(shown)
}
