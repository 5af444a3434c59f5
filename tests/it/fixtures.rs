//! Small helpers several test modules share for the bus layer: a bus with
//! the pushes and dead-letter streams, and a consumer on its own task.

use async_nats::jetstream;
use prost::{Message, Name};
use pushbus_shared::bus::{ConsumeError, ConsumerSpec, Handler, Publisher, run_consumer};
use pushbus_shared::proto::ref_selector::Kind;
use pushbus_shared::proto::{RefSelector, Source, Watch};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::topology::{self, Topology};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A JetStream context with PUSHBUS_PUSHES and the dead-letter stream, and a
/// publisher on it (source `test`).
pub(crate) async fn pushes_bus(nats: &NatsServer) -> (jetstream::Context, Publisher) {
    let js = jetstream::new(testkit::client(nats).await);
    Topology {
        streams: vec![topology::pushes_stream(), topology::dlq_stream()],
        ..Default::default()
    }
    .ensure(&js)
    .await
    .unwrap();
    (js.clone(), test_publisher(&js))
}

/// A publisher whose envelopes name the service `test`.
pub(crate) fn test_publisher(js: &jetstream::Context) -> Publisher {
    Publisher::new(
        js.clone(),
        Source {
            service: "test".into(),
            ..Default::default()
        },
    )
}

/// `run_consumer` on its own task, until `stop`.
pub(crate) struct RunningConsumer {
    token: CancellationToken,
    task: JoinHandle<Result<(), ConsumeError>>,
}

pub(crate) fn spawn_consumer<M, H>(
    js: &jetstream::Context,
    spec: ConsumerSpec,
    handler: H,
) -> RunningConsumer
where
    M: Message + Name + Default + Send + 'static,
    H: Handler<M>,
{
    let token = CancellationToken::new();
    let task = tokio::spawn(run_consumer(js.clone(), spec, handler, token.clone()));
    RunningConsumer { token, task }
}

impl RunningConsumer {
    /// Stops the consumer and checks it ended cleanly.
    pub(crate) async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A watch on every branch of `project_id`.
pub(crate) fn any_branch_of(project_id: i64) -> Watch {
    watch_of(project_id, Kind::AnyBranch)
}

/// A watch on every ref (branches and tags) of `project_id`.
pub(crate) fn any_ref_of(project_id: i64) -> Watch {
    watch_of(project_id, Kind::AnyRef)
}

fn watch_of(project_id: i64, kind: Kind) -> Watch {
    Watch {
        project_id,
        refs: Some(RefSelector {
            kind: kind as i32,
            pattern: String::new(),
        }),
        ..Default::default()
    }
}
