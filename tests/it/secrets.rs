//! The registry never hands out secrets, and agents need a token unless
//! registered as public: through the real `pushbus` binary, the request API
//! and a real notifier.

use std::path::Path;
use std::process::{Command, Output};

use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, AgentRegistryReply, AgentRegistryRequest};
use pushbus_shared::testkit::{self, NatsServer};

use crate::support::{SseReader, Stack};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

fn pushbus(nats_url: &str, args: &[&str]) -> Output {
    Command::new(PUSHBUS)
        .args(["agents", "--nats-url", nats_url])
        .args(args)
        .output()
        .unwrap()
}

fn put_file(nats_url: &str, dir: &Path, name: &str, yaml: &str) -> Output {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    pushbus(nats_url, &["put", "-f", file.to_str().unwrap()])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The stored token hash of `agent_id`, read straight from the bucket.
async fn stored_hash(nats: &NatsServer, agent_id: &str) -> String {
    let js = async_nats::jetstream::new(testkit::client(nats).await);
    let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
    let bytes = kv.get(agent_id).await.unwrap().unwrap();
    AgentConfig::decode(bytes.as_ref()).unwrap().token_sha256
}

async fn status(stack: &Stack, agent_id: &str, token: Option<&str>) -> u16 {
    let url = format!("http://{}/v1/agents/{agent_id}/pokes", stack.notifier);
    SseReader::connect(&url, token).await.status().as_u16()
}

const WATCHES: &str = "watches:\n  - project_id: 42\n    refs: any_branch\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cli_generates_tokens_redacts_reads_and_refuses_tokenless_agents() {
    let nats = NatsServer::start();
    let url = nats.url();
    let tmp = tempfile::tempdir().unwrap();

    // No token in the file: one is generated and printed once, on stdout.
    let out = put_file(
        &url,
        tmp.path(),
        "gen.yaml",
        &format!(
            "agent_id: gen\nwebhook: {{url: \"https://hooks.example.com/h\", secret_token: hook-s3cret}}\n{WATCHES}"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    assert!(text(&out.stderr).contains("shown only now"));
    assert!(!text(&out.stderr).contains(&token));
    let hash = stored_hash(&nats, "gen").await;
    assert_eq!(hash.len(), 64);
    assert_ne!(hash, token, "the token itself was stored");

    // The same file again (say, to change watches): the agent keeps its
    // token, nothing is printed.
    let kept = put_file(
        &url,
        tmp.path(),
        "gen.yaml",
        &format!(
            "agent_id: gen\nwebhook: {{url: \"https://hooks.example.com/h\", secret_token: hook-s3cret}}\n{WATCHES}"
        ),
    );
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    assert_eq!(text(&kept.stdout), "");
    assert!(
        text(&kept.stderr).contains("keeps its token"),
        "{}",
        text(&kept.stderr)
    );
    assert_eq!(stored_hash(&nats, "gen").await, hash);

    // Another new agent from a tokenless file: a different token.
    let again = put_file(
        &url,
        tmp.path(),
        "gen2.yaml",
        &format!("agent_id: gen2\n{WATCHES}"),
    );
    assert_ne!(text(&again.stdout).trim(), token);

    // A token given, or public: nothing generated, nothing printed.
    for (id, credential) in [("given", "token: s3cret"), ("open", "public: true")] {
        let out = put_file(
            &url,
            tmp.path(),
            &format!("{id}.yaml"),
            &format!("agent_id: {id}\n{credential}\n{WATCHES}"),
        );
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "", "{id}");
    }
    let both = put_file(
        &url,
        tmp.path(),
        "both.yaml",
        &format!("agent_id: both\npublic: true\ntoken: t\n{WATCHES}"),
    );
    assert!(!both.status.success());
    assert!(
        text(&both.stderr).contains("public"),
        "{}",
        text(&both.stderr)
    );

    // get shows that secrets exist, never what they are.
    let got = pushbus(&url, &["get", "gen"]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    let shown = text(&got.stdout);
    assert!(shown.contains("token_sha256: <redacted>"), "{shown}");
    assert!(shown.contains("secret_token: <set>"), "{shown}");
    assert!(shown.contains("https://hooks.example.com/h"), "{shown}");
    for secret in [&hash, &token, "hook-s3cret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    let shown = text(&pushbus(&url, &["get", "open"]).stdout);
    assert!(
        shown.contains("public: true") && !shown.contains("token"),
        "{shown}"
    );
    let listed = text(&pushbus(&url, &["list"]).stdout);
    assert_eq!(listed, "gen\ngen2\ngiven\nopen\n");

    // What get printed cannot be put back as is: the placeholders would
    // replace the secrets.
    let redacted = put_file(&url, tmp.path(), "back.yaml", &text(&got.stdout));
    assert!(!redacted.status.success());
    assert!(
        text(&redacted.stderr).contains("<redacted>"),
        "{}",
        text(&redacted.stderr)
    );
    assert_eq!(stored_hash(&nats, "gen").await, hash);

    // The notifier: the generated token works, no token only for public.
    let stack = Stack::start(&url).await;
    assert_eq!(status(&stack, "gen", Some(&token)).await, 200);
    assert_eq!(status(&stack, "gen", None).await, 401);
    assert_eq!(status(&stack, "gen", Some("wrong")).await, 401);
    assert_eq!(status(&stack, "given", Some("s3cret")).await, 200);
    assert_eq!(status(&stack, "open", None).await, 200);
    // Registered without a token through the request API (nothing is
    // generated there) and not public: nobody may follow it.
    let client = testkit::client(&nats).await;
    let reply = client
        .request(
            names::agents_api_subject("put"),
            r#"{"agent_id":"tokenless","watches":[{"project_id":42,"refs":"any_branch"}]}"#.into(),
        )
        .await
        .unwrap();
    assert!(
        !text(&reply.payload).contains("error"),
        "{}",
        text(&reply.payload)
    );
    assert_eq!(status(&stack, "tokenless", None).await, 401);
    assert_eq!(status(&stack, "tokenless", Some("")).await, 401);
    stack.stop().await;
}

// `agents delete` of an ID that is not registered (mistyped, or deleted
// already) fails, as the request API's delete does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_cli_delete_of_an_unknown_agent_fails() {
    let nats = NatsServer::start();
    let url = nats.url();
    let tmp = tempfile::tempdir().unwrap();
    let yaml = format!("agent_id: doomed\ntoken: t0ken\n{WATCHES}");
    assert!(
        put_file(&url, tmp.path(), "doomed.yaml", &yaml)
            .status
            .success()
    );
    let first = pushbus(&url, &["delete", "doomed"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("agent doomed deleted"));
    let again = pushbus(&url, &["delete", "doomed"]);
    assert!(!again.status.success(), "a second delete succeeded");
    assert_eq!(text(&again.stderr).trim(), "Error: no agent \"doomed\"");
    let typo = pushbus(&url, &["delete", "doomde"]);
    assert!(!typo.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_api_reads_are_redacted() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let client = testkit::client(&nats).await;
    let request = |op: &str, body: Vec<u8>| {
        let (client, subject) = (client.clone(), names::agents_api_subject(op));
        async move { client.request(subject, body.into()).await.unwrap().payload }
    };
    let stored = request(
        "put",
        br#"{"agent_id":"api-secret","token":"agent-s3cret","webhook":{"url":"https://hooks.example.com/h","secret_token":"hook-s3cret"},"watches":[{"project_id":7,"refs":"any_branch"}]}"#.to_vec(),
    )
    .await;
    assert!(!text(&stored).contains("error"), "{}", text(&stored));
    let hash = {
        let js = async_nats::jetstream::new(client.clone());
        let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
        let cfg = AgentConfig::decode(kv.get("api-secret").await.unwrap().unwrap()).unwrap();
        cfg.token_sha256
    };
    assert_eq!(hash.len(), 64);

    // JSON, as from `nats req`.
    let got = request("get", br#"{"agent_id":"api-secret"}"#.to_vec()).await;
    let json: serde_json::Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(json["agent"]["token_sha256"], "<redacted>", "{json}");
    assert_eq!(json["agent"]["webhook"]["secret_token"], "<set>", "{json}");
    assert_eq!(
        json["agent"]["webhook"]["url"], "https://hooks.example.com/h",
        "{json}"
    );
    let listed = request("list", b"{}".to_vec()).await;
    // Protobuf.
    let by_id = AgentRegistryRequest {
        agent_id: "api-secret".into(),
        ..Default::default()
    };
    let got_proto = request("get", by_id.encode_to_vec()).await;
    let reply = AgentRegistryReply::decode(got_proto.as_ref()).unwrap();
    assert_eq!(reply.error, "");
    let agent = reply.agent.clone().unwrap();
    assert_eq!(agent.token_sha256, "<redacted>");
    assert_eq!(agent.webhook.unwrap().secret_token, "<set>");
    let listed_proto = request("list", AgentRegistryRequest::default().encode_to_vec()).await;
    for raw in [&got, &listed, &got_proto, &listed_proto] {
        let raw = text(raw);
        for secret in [hash.as_str(), "agent-s3cret", "hook-s3cret"] {
            assert!(!raw.contains(secret), "{secret} in {raw}");
        }
    }

    // Read, then written back unchanged: refused, the secrets stay.
    let back = AgentRegistryRequest {
        agent: reply.agent,
        expected_revision: Some(reply.revision),
        ..Default::default()
    };
    let refused =
        AgentRegistryReply::decode(request("put", back.encode_to_vec()).await.as_ref()).unwrap();
    assert!(refused.error.contains("<redacted>"), "{}", refused.error);
    // Agent files with the placeholders are refused by field.
    let placeholder = request(
        "put",
        br#"{"agent_id":"api-secret","token_sha256":"<redacted>","webhook":{"url":"https://hooks.example.com/h","secret_token":"hook-s3cret"},"watches":[{"project_id":7,"refs":"any_branch"}]}"#.to_vec(),
    )
    .await;
    assert!(
        text(&placeholder).contains("token_sha256"),
        "{}",
        text(&placeholder)
    );
    let placeholder = request(
        "put",
        br#"{"agent_id":"api-secret","token":"agent-s3cret","webhook":{"url":"https://hooks.example.com/h","secret_token":"<set>"},"watches":[{"project_id":7,"refs":"any_branch"}]}"#.to_vec(),
    )
    .await;
    assert!(
        text(&placeholder).contains("webhook.secret_token"),
        "{}",
        text(&placeholder)
    );
    // Oversized globs are refused through the API too, by field.
    let long_glob = format!(
        r#"{{"agent_id":"api-glob","watches":[{{"project_id":7,"refs":"any_branch","paths":["{}x"]}}]}}"#,
        "**/a/".repeat(40)
    );
    let refused = text(&request("put", long_glob.into_bytes()).await);
    assert!(
        refused.contains("watches[0].paths[0]") && refused.contains("segments"),
        "{refused}"
    );

    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
    let cfg = AgentConfig::decode(kv.get("api-secret").await.unwrap().unwrap()).unwrap();
    assert_eq!(cfg.token_sha256, hash);
    assert_eq!(cfg.webhook.unwrap().secret_token, "hook-s3cret");
    stack.stop().await;
}

#[test]
fn webhook_allow_env_is_split_on_commas_and_checked_entry_by_entry() {
    let out = Command::new(PUSHBUS)
        .args(["run", "gitops-notifier"])
        .env("PUSHBUS_WEBHOOK_ALLOW", "10.0.0.0/8,bad entry")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--webhook-allow"), "{err}");
    assert!(err.contains("'bad entry'"), "{err}");
    assert!(!err.contains("10.0.0.0/8,bad"), "{err}");
}
