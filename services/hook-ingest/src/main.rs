#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pushbus_shared::service::run_single::<pushbus_hook_ingest::HookIngest>().await?;
    Ok(())
}
