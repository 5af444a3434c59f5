//! replication-lag's flags: what lag is worth telling the pusher, and when
//! a silent secondary counts as unhealthy.

#[derive(clap::Args, Clone, Debug)]
#[group(id = "lag")]
pub struct Config {
    /// Lag below this many seconds is not worth telling the pusher.
    #[arg(
        long = "lag-threshold-seconds",
        env = "PUSHBUS_LAG_THRESHOLD_SECONDS",
        default_value_t = 1.0
    )]
    pub threshold_seconds: f64,
    /// A secondary silent for this long is reported unhealthy.
    #[arg(
        long = "lag-unhealthy-after-seconds",
        env = "PUSHBUS_LAG_UNHEALTHY_AFTER_SECONDS",
        default_value_t = 60
    )]
    pub unhealthy_after_seconds: u64,
}

pushbus_shared::default_from_flags!(Config);
