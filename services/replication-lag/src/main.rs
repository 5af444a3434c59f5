#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pushbus_shared::service::run_single::<pushbus_replication_lag::ReplicationLag>().await?;
    Ok(())
}
