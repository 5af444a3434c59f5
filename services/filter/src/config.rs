//! filter's flags: how many projects are matched at once, how long a
//! pulled push is held, how long a deleted ref's tombstone is kept.

#[derive(clap::Args, Clone, Debug)]
#[group(id = "filter")]
pub struct Config {
    /// Projects whose pushes are matched in parallel (one replica handles
    /// one project's pushes in order; across replicas only the ref heads are
    /// ordered, by push).
    #[arg(
        long = "filter-concurrency",
        env = "PUSHBUS_FILTER_CONCURRENCY",
        default_value_t = 16
    )]
    pub concurrency: usize,
    /// Seconds before a push pulled by a replica that died is handed to
    /// another one.
    #[arg(
        long = "filter-ack-wait-secs",
        env = "PUSHBUS_FILTER_ACK_WAIT_SECS",
        default_value_t = 30
    )]
    pub ack_wait_secs: u64,
    /// Seconds a deleted branch's or tag's tombstone head is kept: it must
    /// outlive every older push that could still arrive (PUSHBUS_PUSHES
    /// keeps pushes 7 days), or such a push brings the deleted ref back.
    #[arg(
        long = "filter-deleted-ref-ttl-secs",
        env = "PUSHBUS_FILTER_DELETED_REF_TTL_SECS",
        default_value_t = pushbus_shared::heads::DELETED_REF_TTL.as_secs()
    )]
    pub deleted_ref_ttl_secs: u64,
}

pushbus_shared::default_from_flags!(Config);
