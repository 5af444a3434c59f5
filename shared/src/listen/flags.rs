//! The flags every door shares (TLS, how long a client may take, how many
//! connections and requests it may hold), declared once for hook-ingest's
//! and gitops-notifier's doors alike and told apart by a prefix:
//! `--ingest-max-requests` / `PUSHBUS_INGEST_MAX_REQUESTS`,
//! `--notifier-max-requests` / `PUSHBUS_NOTIFIER_MAX_REQUESTS`.
//!
//! clap's derive cannot take a prefix, hence the hand-written `Args`; the
//! names it builds are the ones the derive used to spell out per service.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgGroup, ArgMatches, Command, FromArgMatches};

use super::{DEFAULT_MAX_HEADER_BYTES, Limits, RequestLimits, TlsError};

/// What sets one door's flags apart from another's (a unit struct).
pub trait Door: Clone + std::fmt::Debug + 'static {
    /// `ingest` → `--ingest-tls-cert`, `PUSHBUS_INGEST_TLS_CERT`.
    const PREFIX: &'static str;
    /// What is served over TLS, for the help: "HTTPS and gRPC".
    const SERVES: &'static str;
    /// What must happen within `--<prefix>-request-timeout-ms`, for the help.
    const REQUEST_DEADLINE: &'static str;
    const MAX_CONNECTIONS: usize;
    const MAX_REQUESTS: usize;
    /// Follows "Requests being answered at once" in the help of
    /// `--<prefix>-max-requests`: what is not counted, if anything.
    const REQUESTS_NOT_COUNTED: &'static str = "";
}

/// A door's shared flags; `D` names them.
#[derive(Clone, Debug)]
pub struct DoorFlags<D> {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_connections: usize,
    pub max_requests: usize,
    pub queue_wait_ms: u64,
    door: PhantomData<D>,
}

const TLS_CERT: &str = "tls_cert";
const TLS_KEY: &str = "tls_key";
const HEADER_READ_TIMEOUT_MS: &str = "header_read_timeout_ms";
const REQUEST_TIMEOUT_MS: &str = "request_timeout_ms";
const MAX_CONNECTIONS: &str = "max_connections";
const MAX_REQUESTS: &str = "max_requests";
const QUEUE_WAIT_MS: &str = "queue_wait_ms";
const FIELDS: [&str; 7] = [
    TLS_CERT,
    TLS_KEY,
    HEADER_READ_TIMEOUT_MS,
    REQUEST_TIMEOUT_MS,
    MAX_CONNECTIONS,
    MAX_REQUESTS,
    QUEUE_WAIT_MS,
];

/// `ingest_max_requests`: the flag's clap ID.
fn id<D: Door>(field: &str) -> String {
    format!("{}_{field}", D::PREFIX)
}

/// `ingest-max-requests`: the long flag, without its dashes.
fn long<D: Door>(field: &str) -> String {
    format!("{}-{}", D::PREFIX, field.replace('_', "-"))
}

/// `--ingest-max-requests`, as an operator types it (and refusals name it).
fn flag<D: Door>(field: &str) -> String {
    format!("--{}", long::<D>(field))
}

impl<D: Door> DoorFlags<D> {
    /// The TLS config, when both files are given; an error when only one is.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => super::tls_config(cert, key).map(Some),
            (Some(_), None) => Err(TlsError::Half(flag::<D>(TLS_CERT), flag::<D>(TLS_KEY))),
            (None, Some(_)) => Err(TlsError::Half(flag::<D>(TLS_KEY), flag::<D>(TLS_CERT))),
        }
    }

    /// The request deadline and in-flight bound, for [`super::guard_requests`];
    /// its refusals name these flags.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            timeout: Some(Duration::from_millis(self.request_timeout_ms.max(1))),
            max_in_flight: self.max_requests,
            queue_wait: Duration::from_millis(self.queue_wait_ms),
            timeout_flag: flag::<D>(REQUEST_TIMEOUT_MS),
            in_flight_flag: flag::<D>(MAX_REQUESTS),
            queue_wait_flag: flag::<D>(QUEUE_WAIT_MS),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }

    /// The connection bounds, for [`super::serve`]. HTTP/2 streams per
    /// connection keep their default (256): a proxy, or the pipeline bench,
    /// multiplexes many clients over one connection.
    pub fn limits(&self) -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms.max(1)),
            max_connections: self.max_connections,
            ..Limits::default()
        }
    }
}

impl<D: Door> clap::Args for DoorFlags<D> {
    fn group_id() -> Option<clap::Id> {
        Some(id::<D>("door").into())
    }

    fn augment_args(cmd: Command) -> Command {
        let arg = |field: &'static str, help: String| {
            Arg::new(id::<D>(field))
                .long(long::<D>(field))
                .env(format!("PUSHBUS_{}", id::<D>(field).to_uppercase()))
                .value_name(field.to_uppercase())
                .action(ArgAction::Set)
                .help(help)
        };
        let path = |field, help| arg(field, help).value_parser(clap::value_parser!(PathBuf));
        let millis = |field, help, default: u64| {
            arg(field, help)
                .value_parser(clap::value_parser!(u64))
                .default_value(default.to_string())
        };
        let count = |field, help, default: usize| {
            arg(field, help)
                .value_parser(clap::value_parser!(usize))
                .default_value(default.to_string())
        };
        cmd.group(
            ArgGroup::new(id::<D>("door"))
                .multiple(true)
                .args(FIELDS.map(id::<D>)),
        )
        .arg(path(
            TLS_CERT,
            format!(
                "PEM certificate chain: serve {} over TLS (with {})",
                D::SERVES,
                flag::<D>(TLS_KEY)
            ),
        ))
        .arg(path(
            TLS_KEY,
            format!("PEM private key of {}", flag::<D>(TLS_CERT)),
        ))
        .arg(millis(
            HEADER_READ_TIMEOUT_MS,
            "A connection must finish its TLS handshake and each request head within this".into(),
            5000,
        ))
        .arg(millis(
            REQUEST_TIMEOUT_MS,
            D::REQUEST_DEADLINE.into(),
            10_000,
        ))
        .arg(count(
            MAX_CONNECTIONS,
            "Open connections; further ones are closed at once".into(),
            D::MAX_CONNECTIONS,
        ))
        .arg(count(
            MAX_REQUESTS,
            format!(
                "Requests being answered at once{}; further ones wait for a slot \
                 (see {}), then get 503 / RESOURCE_EXHAUSTED",
                D::REQUESTS_NOT_COUNTED,
                flag::<D>(QUEUE_WAIT_MS)
            ),
            D::MAX_REQUESTS,
        ))
        .arg(millis(
            QUEUE_WAIT_MS,
            format!(
                "How long a request over {} waits for a slot before its 503 \
                 (0: refused at once)",
                flag::<D>(MAX_REQUESTS)
            ),
            500,
        ))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<D: Door> FromArgMatches for DoorFlags<D> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(DoorFlags {
            tls_cert: given::<D, PathBuf>(matches, TLS_CERT)?,
            tls_key: given::<D, PathBuf>(matches, TLS_KEY)?,
            header_read_timeout_ms: defaulted::<D, _>(matches, HEADER_READ_TIMEOUT_MS)?,
            request_timeout_ms: defaulted::<D, _>(matches, REQUEST_TIMEOUT_MS)?,
            max_connections: defaulted::<D, _>(matches, MAX_CONNECTIONS)?,
            max_requests: defaulted::<D, _>(matches, MAX_REQUESTS)?,
            queue_wait_ms: defaulted::<D, _>(matches, QUEUE_WAIT_MS)?,
            door: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        // Every other flag has a default, so it is always in `matches`; a
        // file flag left out keeps what it was.
        let mut new = Self::from_arg_matches(matches)?;
        new.tls_cert = new.tls_cert.or(self.tls_cert.take());
        new.tls_key = new.tls_key.or(self.tls_key.take());
        *self = new;
        Ok(())
    }
}

fn given<D: Door, T: Clone + Send + Sync + 'static>(
    matches: &ArgMatches,
    field: &str,
) -> Result<Option<T>, clap::Error> {
    matches
        .try_get_one::<T>(&id::<D>(field))
        .map(Option::<&T>::cloned)
        .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))
}

fn defaulted<D: Door, T: Clone + Send + Sync + 'static>(
    matches: &ArgMatches,
    field: &str,
) -> Result<T, clap::Error> {
    given::<D, T>(matches, field)?.ok_or_else(|| {
        clap::Error::raw(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!("{} has no value", flag::<D>(field)),
        )
    })
}

impl<D: Door> Default for DoorFlags<D> {
    fn default() -> Self {
        crate::service::flag_defaults()
    }
}

#[cfg(test)]
mod tests {
    use clap::Args;

    use super::*;

    /// Two doors with their own names and defaults.
    macro_rules! door {
        ($name:ident, $prefix:literal, $connections:literal, $requests:literal) => {
            #[derive(Clone, Debug)]
            struct $name;
            impl Door for $name {
                const PREFIX: &'static str = $prefix;
                const SERVES: &'static str = "HTTPS";
                const REQUEST_DEADLINE: &'static str = "A request must be answered within this";
                const MAX_CONNECTIONS: usize = $connections;
                const MAX_REQUESTS: usize = $requests;
            }
        };
    }
    door!(Front, "front", 7, 3);
    door!(Back, "back", 70, 30);

    fn both() -> Command {
        DoorFlags::<Back>::augment_args(DoorFlags::<Front>::augment_args(Command::new("t")))
    }

    #[test]
    fn each_door_has_its_own_names_and_defaults() {
        let cmd = both();
        let arg = |id: &str| cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
        let front = arg("front_max_requests");
        assert_eq!(front.get_long(), Some("front-max-requests"));
        assert_eq!(
            front.get_env(),
            Some(std::ffi::OsStr::new("PUSHBUS_FRONT_MAX_REQUESTS"))
        );
        let help = front
            .get_help()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(help.contains("(see --front-queue-wait-ms)"), "{help}");
        assert_eq!(
            arg("back_tls_cert").get_env(),
            Some(std::ffi::OsStr::new("PUSHBUS_BACK_TLS_CERT"))
        );
        let (f, b) = (DoorFlags::<Front>::default(), DoorFlags::<Back>::default());
        assert_eq!((f.max_connections, f.max_requests), (7, 3));
        assert_eq!((b.max_connections, b.max_requests), (70, 30));
        assert_eq!(
            (
                f.header_read_timeout_ms,
                f.request_timeout_ms,
                f.queue_wait_ms
            ),
            (5000, 10_000, 500)
        );
        assert_eq!((f.tls_cert, f.tls_key), (None, None));
    }

    #[test]
    fn flags_given_on_the_command_line_reach_their_door_only() {
        let matches = both()
            .mut_args(|a| a.env(None))
            .try_get_matches_from([
                "t",
                "--front-max-requests",
                "9",
                "--back-tls-cert",
                "/c.pem",
                "--back-queue-wait-ms",
                "0",
            ])
            .unwrap();
        let f = DoorFlags::<Front>::from_arg_matches(&matches).unwrap();
        let b = DoorFlags::<Back>::from_arg_matches(&matches).unwrap();
        assert_eq!(
            (f.max_requests, f.queue_wait_ms, f.tls_cert),
            (9, 500, None)
        );
        assert_eq!(
            (b.max_requests, b.queue_wait_ms, b.tls_cert),
            (30, 0, Some(PathBuf::from("/c.pem")))
        );
        let refused = both().mut_args(|a| a.env(None)).try_get_matches_from([
            "t",
            "--front-max-requests",
            "many",
        ]);
        assert!(refused.is_err(), "a count that is no number is refused");
    }

    #[test]
    fn limits_and_refusals_name_the_doors_flags() {
        let mut f = DoorFlags::<Front> {
            request_timeout_ms: 0,
            ..Default::default()
        };
        let limits = f.request_limits();
        assert_eq!(limits.in_flight_flag, "--front-max-requests");
        assert_eq!(limits.queue_wait_flag, "--front-queue-wait-ms");
        assert_eq!(limits.timeout_flag, "--front-request-timeout-ms");
        assert_eq!(
            limits.timeout,
            Some(Duration::from_millis(1)),
            "0 is not 'none'"
        );
        assert_eq!(f.limits().max_connections, 7);
        f.tls_key = Some("/k.pem".into());
        let half = f.tls().unwrap_err().to_string();
        assert_eq!(
            half,
            "--front-tls-key is set without --front-tls-cert: give both the certificate and the key"
        );
    }

    #[test]
    fn an_update_keeps_the_files_it_is_not_given() {
        let mut f = DoorFlags::<Front> {
            tls_cert: Some("/c.pem".into()),
            ..Default::default()
        };
        let matches = both()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["t", "--front-max-connections", "2"])
            .unwrap();
        f.update_from_arg_matches(&matches).unwrap();
        assert_eq!((f.max_connections, f.tls_cert), (2, Some("/c.pem".into())));
    }
}
