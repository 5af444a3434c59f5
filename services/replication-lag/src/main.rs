#[tokio::main]
async fn main() -> std::process::ExitCode {
    let hosted =
        pushbus_shared::service::run_single::<pushbus_replication_lag::ReplicationLag>().await;
    pushbus_shared::error::exit_code(hosted.err())
}
