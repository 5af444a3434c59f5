//! Running pushbus services in-process against a test nats-server.

use std::net::SocketAddr;
use std::time::Duration;

use pushbus_filter::Filter;
use pushbus_gitops_notifier::GitopsNotifier;
use pushbus_hook_ingest::HookIngest;
use pushbus_replication_lag::ReplicationLag;
use pushbus_shared::service::{self, Launcher, Listen};
use tokio_util::sync::CancellationToken;

use crate::poll::{poll, until_ready};

/// What `Stack::start_with` varies.
pub struct StackOptions {
    pub secret_file: Option<std::path::PathBuf>,
    pub lag_budget_ms: u64,
    /// `None`: no replication-lag in this stack (run it as a `Replica`, or not at all).
    pub lag: Option<pushbus_replication_lag::Config>,
    /// hook-ingest's `--ingest-geo-routes`.
    pub geo_routes: bool,
    /// `--replicas` of every service.
    pub replicas: u8,
    /// `--bus-no-cloudevents`.
    pub no_cloudevents: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            secret_file: None,
            lag_budget_ms: 250,
            lag: Some(Default::default()),
            geo_routes: false,
            replicas: 1,
            no_cloudevents: false,
        }
    }
}

pub struct Stack {
    pub ingest: SocketAddr,
    pub notifier: SocketAddr,
    pub ops: SocketAddr,
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), service::HostError>>,
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A listener on 127.0.0.1, port chosen by the OS, and its address: held
/// from here on, so no other process can take the port in between.
pub async fn bind_local() -> (Listen, SocketAddr) {
    let listen = Listen::local().await.expect("bind 127.0.0.1:0");
    let addr = listen.addr().expect("bound address");
    (listen, addr)
}

impl Stack {
    /// Starts all four services and waits until /readyz says ready.
    pub async fn start(nats_url: &str) -> Stack {
        Self::start_with_secret(nats_url, None).await
    }

    /// Same, with hook-ingest authenticating against `secret_file`.
    pub async fn start_with_secret(
        nats_url: &str,
        secret_file: Option<std::path::PathBuf>,
    ) -> Stack {
        Self::start_with(
            nats_url,
            StackOptions {
                secret_file,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn start_with(nats_url: &str, opts: StackOptions) -> Stack {
        let (ingest_listener, ingest) = bind_local().await;
        let (notifier_listener, notifier) = bind_local().await;
        let (ops_listener, ops) = bind_local().await;
        let ingest_cfg = pushbus_hook_ingest::Config {
            secret_file: opts.secret_file,
            lag_budget_ms: opts.lag_budget_ms,
            geo_routes: opts.geo_routes,
            ..pushbus_hook_ingest::Config::new(ingest)
        };
        let notifier_cfg = pushbus_gitops_notifier::Config::new(notifier);
        let mut launchers = vec![
            Launcher::bound::<HookIngest>(ingest_cfg, ingest_listener),
            Launcher::service::<Filter>(Default::default()),
            Launcher::bound::<GitopsNotifier>(notifier_cfg, notifier_listener),
        ];
        if let Some(lag_cfg) = opts.lag {
            launchers.push(Launcher::service::<ReplicationLag>(lag_cfg));
        }
        let token = CancellationToken::new();
        let mut bus = service::BusConfig::from(nats_url);
        bus.topology.replicas = opts.replicas;
        bus.no_cloudevents = opts.no_cloudevents;
        let task = tokio::spawn({
            let token = token.clone();
            async move { service::host(bus, ops_listener, launchers, token).await }
        });
        let stack = Stack {
            ingest,
            notifier,
            ops,
            token,
            task,
        };
        stack.wait_ready().await;
        stack
    }

    async fn wait_ready(&self) {
        until_ready(&format!("http://{}/readyz", self.ops)).await;
    }

    /// Graceful stop; fails the test if any service failed.
    pub async fn stop(self) {
        self.token.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stack did not stop within 30s")
            .expect("host task panicked");
        result.expect("a service failed");
    }
}

/// Reads Server-Sent Events: (event name, data).
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
    /// The last `id:` seen, as an EventSource keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
}

impl SseReader {
    pub async fn connect(url: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("SSE request")
    }

    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: String::new(),
            last_id: None,
        }
    }

    pub async fn next_event(&mut self, within: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        self.last_id = Some(v.trim().to_owned());
                    }
                }
                if event.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((event, data));
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

impl Stack {
    /// POSTs a post_receive body (plus headers) to hook-ingest.
    pub async fn post_receive(
        &self,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        post_receive(self.ingest, body, headers).await
    }
}

/// POSTs a post_receive body (plus headers) to the hook-ingest at `ingest`.
pub async fn post_receive(
    ingest: SocketAddr,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let url = format!("http://{ingest}/api/v4/internal/post_receive");
    let mut req = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("post_receive request")
}

/// Posts `body` until hook-ingest stores it (200), retrying its 503s as the
/// hook would (NATS still starting, or away); any other answer fails the test.
pub async fn push_stored(ingest: SocketAddr, body: &serde_json::Value) {
    let what = "push taken by hook-ingest";
    let every = Duration::from_millis(200);
    poll(
        what,
        Duration::from_secs(20),
        every,
        async || match post_receive(ingest, body, &[]).await.status() {
            reqwest::StatusCode::OK => Ok(()),
            reqwest::StatusCode::SERVICE_UNAVAILABLE => Err("503".into()),
            refused => panic!("push refused: {refused}"),
        },
    )
    .await
}

/// Every event of type `M` stored in `stream` so far, with its identity.
pub async fn stored_events<M: prost::Message + prost::Name + Default>(
    nats: &pushbus_shared::testkit::NatsServer,
    stream: &str,
) -> Vec<(pushbus_shared::EventMeta, M)> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(nats).await);
    let stream = js.get_stream(stream).await.unwrap();
    let count = stream.get_info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap().take(count);
    let mut out = Vec::new();
    while let Some(m) = messages.next().await {
        let env = pushbus_shared::envelope::decode(&m.unwrap().payload).unwrap();
        out.push((
            pushbus_shared::EventMeta::from(&env),
            pushbus_shared::envelope::open(&env).unwrap(),
        ));
    }
    out
}

/// Every ref head in pushbus-ref-heads (removal markers skipped), and how
/// many writes the bucket has taken (its stream's last sequence): a write
/// made twice shows as more writes than heads.
pub async fn stored_heads(
    nats: &pushbus_shared::testkit::NatsServer,
) -> (Vec<pushbus_shared::proto::RefHead>, u64) {
    use futures::StreamExt;
    use prost::Message;
    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(nats).await);
    let stream = js
        .get_stream(pushbus_shared::names::STREAM_REF_HEADS)
        .await
        .unwrap();
    let state = stream.get_info().await.unwrap().state;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer
        .messages()
        .await
        .unwrap()
        .take(state.messages as usize);
    let mut heads = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m.unwrap();
        if pushbus_shared::heads::removal(m.headers.as_ref()).is_some() {
            continue;
        }
        heads.push(pushbus_shared::proto::RefHead::decode(m.payload.as_ref()).unwrap());
    }
    (heads, state.last_sequence)
}

/// The filter of the tests. A stopped replica's in-flight pushes come back
/// after ack_wait (so may a push the server handed to a replica as it
/// stopped); keep it short so tests see them. A test that creates the
/// consumer before any replica runs must create it with this, since a
/// service leaves an existing consumer as it is.
pub fn filter_config() -> pushbus_filter::Config {
    pushbus_filter::Config {
        ack_wait_secs: 2,
        ..Default::default()
    }
}

/// One filter replica, hosted like in production.
pub struct Replica {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), service::HostError>>,
}

impl Replica {
    pub async fn filter(nats_url: &str) -> Replica {
        Self::host(nats_url, Launcher::service::<Filter>(filter_config())).await
    }

    /// One gitops-notifier replica listening on `listen` (an address to
    /// bind, e.g. again after a restart, or a bound listener).
    pub async fn notifier(nats_url: &str, listen: impl Into<Listen>) -> Replica {
        let config = pushbus_gitops_notifier::Config::default();
        Self::notifier_on(nats_url, config, listen).await
    }

    /// One hook-ingest listening on `listen`, without authentication.
    pub async fn ingest(nats_url: &str, listen: impl Into<Listen>) -> Replica {
        let listen = listen.into();
        let config = pushbus_hook_ingest::Config::new(listen.addr().expect("listen address"));
        Self::host(nats_url, Launcher::bound::<HookIngest>(config, listen)).await
    }

    /// One hook-ingest with this configuration on `listen`.
    pub async fn ingest_on(
        nats_url: &str,
        config: pushbus_hook_ingest::Config,
        listen: impl Into<Listen>,
    ) -> Replica {
        Self::host(
            nats_url,
            Launcher::bound::<HookIngest>(config, listen.into()),
        )
        .await
    }

    /// One gitops-notifier with this configuration on `listen`.
    pub async fn notifier_on(
        nats_url: &str,
        config: pushbus_gitops_notifier::Config,
        listen: impl Into<Listen>,
    ) -> Replica {
        let launcher = Launcher::bound::<GitopsNotifier>(config, listen.into());
        Self::host(nats_url, launcher).await
    }

    /// One replication-lag instance in its own host (restart tests).
    pub async fn replication_lag(
        nats_url: &str,
        config: pushbus_replication_lag::Config,
    ) -> Replica {
        Self::host(nats_url, Launcher::service::<ReplicationLag>(config)).await
    }

    /// One gitops-notifier with these webhook settings (its agent port free).
    pub async fn notifier_with_webhooks(
        nats_url: &str,
        webhooks: pushbus_gitops_notifier::webhook::WebhookConfig,
    ) -> Replica {
        let config = pushbus_gitops_notifier::Config {
            webhooks,
            ..Default::default()
        };
        Self::notifier_on(nats_url, config, bind_local().await.0).await
    }

    async fn host(nats_url: &str, launcher: Launcher) -> Replica {
        let (ops_listener, ops) = bind_local().await;
        let token = CancellationToken::new();
        let url = nats_url.to_owned();
        let task = tokio::spawn({
            let token = token.clone();
            async move { service::host(&url, ops_listener, vec![launcher], token).await }
        });
        until_ready(&format!("http://{ops}/readyz")).await;
        Replica { token, task }
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("replica did not stop")
            .unwrap()
            .expect("replica failed");
    }
}

/// Registers public (tokenless) `agent_id` watching any branch of each of `projects`.
pub async fn register(
    nats: &pushbus_shared::testkit::NatsServer,
    agent_id: &str,
    projects: impl Iterator<Item = i64>,
) {
    let cfg = pushbus_shared::proto::AgentConfig {
        agent_id: agent_id.into(),
        watches: projects.map(crate::fixtures::any_branch_of).collect(),
        public: true,
        ..Default::default()
    };
    crate::fixtures::put_agent(nats, &cfg).await;
}
