//! The spool: notifications hook-ingest did not store, written durably and
//! replayed in order by the next hook run or `pushbus hook flush`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pushbus_shared::envelope;
use tokio::time::Instant;

use super::send::{SendError, Sender};
use super::{FlushReport, HookError, now_unix};

/// A spooled notification on disk.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SpoolEntry {
    pub(super) correlation_id: String,
    /// Unix seconds; absent in entries written before it existed (then the
    /// file's mtime stands in).
    #[serde(default)]
    pub(super) spooled_at: Option<u64>,
    pub(super) body: serde_json::Value,
}

/// Writes one entry atomically and durably: temp file in the same
/// directory, fsync, rename, fsync the directory. The name never comes from
/// the correlation ID alone (it may hold `/` or `..`): a time-ordered UUID
/// keeps replay order and uniqueness, a sanitized ID fragment helps humans.
pub(super) fn write_spool(
    dir: &Path,
    correlation_id: &str,
    body: &serde_json::Value,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let entry = SpoolEntry {
        correlation_id: correlation_id.to_owned(),
        spooled_at: Some(now_unix().max(0) as u64),
        body: body.clone(),
    };
    let text = serde_json::to_vec(&entry)?;
    let fragment: String = correlation_id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{}-{fragment}.json", uuid::Uuid::now_v7().simple());
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let path = dir.join(&name);
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)?;
    Ok(path)
}

/// Makes a rename in `dir` survive a crash.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves a spool file into `<spool>/<sub>/`, never deleting it.
pub(super) fn set_aside(dir: &Path, path: &Path, sub: &str) -> std::io::Result<PathBuf> {
    let target_dir = dir.join(sub);
    std::fs::create_dir_all(&target_dir)?;
    let target = target_dir.join(path.file_name().unwrap_or_default());
    std::fs::rename(path, &target)?;
    sync_dir(&target_dir)?;
    sync_dir(dir)?;
    Ok(target)
}

pub(super) fn age_of(entry: &SpoolEntry, path: &Path) -> Duration {
    let now = SystemTime::now();
    let at = match entry.spooled_at {
        Some(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        None => std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(now),
    };
    now.duration_since(at).unwrap_or_default()
}

/// Replays what `dir` holds, oldest first. A spool that does not exist
/// holds nothing; one that cannot be read is an error, not an empty spool.
pub(super) async fn flush_spool(
    sender: &Sender,
    dir: &Path,
    max_age: Duration,
    deadline: Instant,
) -> Result<FlushReport, HookError> {
    let mut report = FlushReport::default();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(source) => {
            return Err(HookError::Spool {
                path: dir.to_owned(),
                source,
            });
        }
    };
    // Names start with a UUIDv7: name order is spool order.
    files.sort();
    for (i, path) in files.iter().enumerate() {
        let entry: Option<SpoolEntry> = std::fs::read(path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .filter(|e: &SpoolEntry| envelope::is_valid_correlation_id(&e.correlation_id));
        let Some(entry) = entry else {
            // Unreadable: set aside rather than block the spool forever.
            let moved = std::fs::rename(path, path.with_extension("bad"));
            report.lines.push(format!(
                "pushbus: spooled notification {} is unreadable; {}",
                path.display(),
                match moved {
                    Ok(()) => "renamed to .bad".to_owned(),
                    Err(e) => format!("cannot rename it: {e}"),
                }
            ));
            continue;
        };
        let id = &entry.correlation_id;
        let age = age_of(&entry, path);
        if age > max_age {
            // Replaying it could store the push again once the stream has
            // forgotten its event ID; an operator decides instead.
            let hours = age.as_secs() / 3600;
            report.lines.push(match set_aside(dir, path, "expired") {
                Ok(to) => {
                    report.expired += 1;
                    format!(
                        "pushbus: spooled notification {id} is {hours} h old (over --spool-max-age-hours {}); not replayed, moved to {}",
                        max_age.as_secs() / 3600,
                        to.display()
                    )
                }
                Err(e) => format!(
                    "pushbus: spooled notification {id} is {hours} h old; not replayed, and cannot move it to expired/: {e}"
                ),
            });
            continue;
        }
        if Instant::now() >= deadline {
            report.left = files.len() - i;
            report.stopped = Some(SendError::NotStored("--timeout-ms reached".into()));
            break;
        }
        match sender.send(&entry.body, id, deadline).await {
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(path).and_then(|()| sync_dir(dir)) {
                    report.lines.push(format!(
                        "pushbus: replayed {id} but cannot remove {}: {e}",
                        path.display()
                    ));
                }
                report.delivered += 1;
            }
            // Refused content will never be accepted: set aside, say why.
            Err(SendError::Refused(e)) => {
                report.lines.push(match set_aside(dir, path, "refused") {
                    Ok(to) => format!(
                        "pushbus: spooled notification {id} refused ({e}); moved to {}",
                        to.display()
                    ),
                    Err(io) => format!(
                        "pushbus: spooled notification {id} refused ({e}); cannot move it: {io}"
                    ),
                })
            }
            // Still unavailable: keep this and the rest for next time.
            Err(e) => {
                report.left = files.len() - i;
                report.stopped = Some(e);
                break;
            }
        }
    }
    Ok(report)
}
