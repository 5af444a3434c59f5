#[tokio::main]
async fn main() -> std::process::ExitCode {
    let hosted =
        pushbus_shared::service::run_single::<pushbus_gitops_notifier::GitopsNotifier>().await;
    pushbus_shared::error::exit_code(hosted.err())
}
