#[tokio::main]
async fn main() -> std::process::ExitCode {
    let hosted = pushbus_shared::service::run_single::<pushbus_hook_ingest::HookIngest>().await;
    pushbus_shared::error::exit_code(hosted.err())
}
