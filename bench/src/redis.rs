//! The Redis pub/sub baseline (how push events were fanned out before):
//! the same events, open loop at the same rates, over PUBLISH/SUBSCRIBE on
//! one channel with one subscriber, as each agent-server replica had; and
//! what a subscriber that reconnects mid-run misses. A minimal RESP client
//! (PUBLISH, SUBSCRIBE and their replies) keeps a Redis crate out of the
//! build.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::pipeline::Plan;
use super::{Recorder, Step, open_loop};

pub struct Baseline {
    pub steps: Vec<Step>,
    pub restart_published: u64,
    pub restart_received: u64,
}

pub async fn run(url: &str, plan: &Plan, size: usize) -> anyhow::Result<Baseline> {
    let addr = url
        .strip_prefix("redis://")
        .context("--redis-url must be redis://host:port")?
        .trim_end_matches('/')
        .to_owned();
    let channel = format!("pushbus-bench-{}", std::process::id());
    let restart_n = (plan.restart_rate as f64 * plan.restart_seconds) as u64;
    let total = plan
        .rates
        .iter()
        .map(|r| (*r as f64 * plan.seconds) as u64)
        .sum::<u64>()
        + restart_n;
    let recorder = Recorder::new(total);
    let mut sub = subscribe(&addr, &channel, &recorder).await?;
    let publisher = Publisher::connect(&addr, &channel, size).await?;

    let mut steps = Vec::new();
    let mut lo = 0;
    for &rate in &plan.rates {
        let n = (rate as f64 * plan.seconds) as u64;
        let step = run_step(&publisher, &recorder, lo, n, rate, None).await;
        eprintln!("{}", step.line(&format!("Redis {rate}/s"), step.lost()));
        steps.push(step);
        lo += n;
    }
    let restart = run_step(
        &publisher,
        &recorder,
        lo,
        restart_n,
        plan.restart_rate,
        Some((&mut sub, &addr, &channel)),
    )
    .await;
    sub.cancel();
    Ok(Baseline {
        steps,
        restart_published: restart_n,
        restart_received: restart.received,
    })
}

async fn run_step(
    publisher: &Publisher,
    recorder: &std::sync::Arc<Recorder>,
    lo: u64,
    n: u64,
    rate: u64,
    restart: Option<(&mut CancellationToken, &str, &str)>,
) -> Step {
    let t0 = Instant::now() + Duration::from_millis(50);
    recorder.begin(lo, n, t0, rate as f64);
    let tx = publisher.tx.clone();
    let sending = tokio::spawn(open_loop(n, rate as f64, t0, move |j| {
        let _ = tx.send(lo + j);
    }));
    if let Some((sub, addr, channel)) = restart {
        tokio::time::sleep_until(
            (t0 + Duration::from_secs_f64(n as f64 / rate as f64 / 2.0)).into(),
        )
        .await;
        // Drop the subscription connection and subscribe again at once.
        sub.cancel();
        match subscribe(addr, channel, recorder).await {
            Ok(new) => *sub = new,
            Err(err) => eprintln!("Redis resubscribe failed: {err:#}"),
        }
    }
    let _ = sending.await;
    recorder
        .finish(n, Duration::from_secs(2), Duration::from_secs(30))
        .await
}

/// SUBSCRIBE on a new connection; returns once Redis confirmed it, with
/// the token that drops the connection.
async fn subscribe(
    addr: &str,
    channel: &str,
    recorder: &std::sync::Arc<Recorder>,
) -> anyhow::Result<CancellationToken> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to Redis at {addr}"))?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(&command(&[b"SUBSCRIBE", channel.as_bytes()]))
        .await?;
    let mut read = BufReader::new(read);
    let confirm = read_frame(&mut read).await?;
    anyhow::ensure!(
        confirm.first().is_some_and(|k| k == b"subscribe"),
        "unexpected reply to SUBSCRIBE"
    );
    let stop = CancellationToken::new();
    let recorder = recorder.clone();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let _write = write;
            loop {
                let frame = tokio::select! {
                    _ = stop.cancelled() => return,
                    f = read_frame(&mut read) => f,
                };
                match frame {
                    Ok(items) if items.len() == 3 && items[0] == b"message" => {
                        if let Some(seq) = items[2].get(..8).and_then(|b| b.try_into().ok()) {
                            recorder.record(u64::from_le_bytes(seq));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    Ok(stop)
}

/// One connection, PUBLISH commands pipelined by a writer task; replies
/// (subscriber counts) are read and dropped.
struct Publisher {
    tx: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl Publisher {
    async fn connect(addr: &str, channel: &str, size: usize) -> anyhow::Result<Publisher> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let channel = channel.as_bytes().to_vec();
        tokio::spawn(async move {
            let mut payload = vec![b'x'; size.max(8)];
            let mut buf = Vec::new();
            while let Some(seq) = rx.recv().await {
                buf.clear();
                let mut next = Some(seq);
                // Everything due now goes out in one write.
                while let Some(seq) = next {
                    payload[..8].copy_from_slice(&seq.to_le_bytes());
                    buf.extend_from_slice(&command(&[b"PUBLISH", &channel, &payload]));
                    next = rx.try_recv().ok();
                }
                if write.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            while read_frame(&mut read).await.is_ok() {}
        });
        Ok(Publisher { tx })
    }
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One RESP reply: a flat array of bulk strings / integers, or a single
/// one (all PUBLISH and SUBSCRIBE ever answer).
async fn read_frame<R: AsyncBufReadExt + AsyncReadExt + Unpin>(
    r: &mut R,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let line = read_line(r).await?;
    match line.first() {
        Some(b'*') => {
            let n: usize = std::str::from_utf8(&line[1..])?.parse()?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let item = read_line(r).await?;
                items.push(read_item(r, item).await?);
            }
            Ok(items)
        }
        _ => Ok(vec![read_item(r, line).await?]),
    }
}

async fn read_item<R: AsyncBufReadExt + AsyncReadExt + Unpin>(
    r: &mut R,
    line: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    match line.first() {
        Some(b'$') => {
            let len: usize = std::str::from_utf8(&line[1..])?.parse()?;
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(len);
            Ok(buf)
        }
        Some(b'-') => anyhow::bail!("Redis error: {}", String::from_utf8_lossy(&line[1..])),
        _ => Ok(line.get(1..).unwrap_or_default().to_vec()),
    }
}

async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> anyhow::Result<Vec<u8>> {
    let mut line = Vec::new();
    anyhow::ensure!(
        r.read_until(b'\n', &mut line).await? > 0,
        "connection closed"
    );
    while line.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        line.pop();
    }
    Ok(line)
}
