#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pushbus_shared::service::run_single::<pushbus_gitops_notifier::GitopsNotifier>().await?;
    Ok(())
}
