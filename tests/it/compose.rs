//! Static checks of docker-compose.yml and the Dockerfile against the
//! `pushbus` CLI, so the file cannot drift from the binary's services and
//! flags. They need no Docker; `make compose-test` runs the stack itself.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_norway::{Mapping, Value};

/// The services `pushbus run` accepts, each a compose service of that name.
const SERVICES: [&str; 4] = [
    "hook-ingest",
    "filter",
    "gitops-notifier",
    "replication-lag",
];

/// Listen addresses that must be reachable from outside their container.
const PUBLIC_LISTEN: [(&str, &str); 2] = [
    ("hook-ingest", "PUSHBUS_INGEST_LISTEN"),
    ("gitops-notifier", "PUSHBUS_NOTIFIER_LISTEN"),
];

pub fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `services` of docker-compose.yml, with `<<:` merge keys applied.
fn compose_services() -> Mapping {
    let mut doc: Value = serde_norway::from_str(&repo_file("docker-compose.yml"))
        .expect("docker-compose.yml is not valid YAML");
    doc.apply_merge()
        .expect("docker-compose.yml: bad `<<:` merge key");
    doc.get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no `services` mapping")
        .clone()
}

fn service<'a>(services: &'a Mapping, name: &str) -> &'a Value {
    services
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// A service's `environment`, in either the mapping or the `KEY=VALUE` list form.
fn environment(svc: &Value) -> Vec<(String, String)> {
    match svc.get("environment") {
        None => Vec::new(),
        Some(Value::Mapping(m)) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("`environment` must be a mapping or a list, got {other:?}"),
    }
}

/// Container ports of a service's `ports`, short ("8080:8080", "127.0.0.1:80:8080/tcp")
/// or long (`target:`) syntax.
fn container_ports(svc: &Value) -> Vec<u16> {
    let Some(ports) = svc.get("ports") else {
        return Vec::new();
    };
    let ports = ports.as_sequence().expect("`ports` must be a list");
    ports
        .iter()
        .map(|p| {
            let spec = match p.get("target") {
                Some(target) => scalar(target),
                None => scalar(p),
            };
            let port = spec.rsplit(':').next().unwrap_or_default();
            let port = port.split('/').next().unwrap_or_default();
            port.parse()
                .unwrap_or_else(|_| panic!("cannot read the container port of `{spec}`"))
        })
        .collect()
}

/// True when `word` occurs in `text` on its own, not as part of a longer
/// name (`filter` in `--filter-concurrency`, `PUSHBUS_X` in `PUSHBUS_X_Y`).
fn contains_word(text: &str, word: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| {
        !text[..i].ends_with(part_of_name) && !text[i + word.len()..].starts_with(part_of_name)
    })
}

/// `pushbus run --help`, run without any `PUSHBUS_*` variables of ours.
pub fn run_help() -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushbus"));
    cmd.args(["run", "--help"]);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PUSHBUS_")) {
        cmd.env_remove(key);
    }
    let out = cmd.output().expect("running `pushbus run --help`");
    assert!(
        out.status.success(),
        "`pushbus run --help` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("`pushbus run --help` printed invalid UTF-8")
}

#[test]
fn compose_runs_each_service_pushbus_run_accepts() {
    let services = compose_services();
    let help = run_help();

    let mut names: Vec<String> = services.keys().map(scalar).collect();
    names.sort();
    let mut expected: Vec<String> = ["nats", "nats-box", "setup"]
        .iter()
        .chain(&SERVICES)
        .map(|s| s.to_string())
        .collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "docker-compose.yml must hold nats, nats-box, setup and exactly the four pushbus services"
    );
    let setup: Vec<String> = service(&services, "setup")
        .get("command")
        .and_then(Value::as_sequence)
        .map(|c| c.iter().map(scalar).collect())
        .unwrap_or_default();
    assert_eq!(
        setup,
        ["setup"],
        "compose service `setup` must run `pushbus setup`"
    );

    for name in SERVICES {
        assert!(
            contains_word(&help, name),
            "`pushbus run --help` does not list the service `{name}` that docker-compose.yml runs:\n{help}"
        );
        let command = service(&services, name)
            .get("command")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("compose service `{name}` needs `command` as a list"));
        let command: Vec<String> = command.iter().map(scalar).collect();
        assert_eq!(
            command,
            ["run", name],
            "compose service `{name}` must run `pushbus run {name}`"
        );
    }
}

#[test]
fn compose_env_vars_are_pushbus_flags_and_image_is_the_dockerfile() {
    let services = compose_services();
    let help = run_help();

    for (name, svc) in &services {
        for (key, _) in environment(svc)
            .into_iter()
            .filter(|(k, _)| k.starts_with("PUSHBUS_"))
        {
            assert!(
                contains_word(&help, &key),
                "compose service `{}` sets {key}, which is not a flag of `pushbus run` (not in its --help):\n{help}",
                scalar(name)
            );
        }
    }

    let dockerfile = repo_file("Dockerfile");
    assert!(
        contains_word(&dockerfile, "--bin pushbus"),
        "the Dockerfile must `cargo build --bin pushbus`"
    );
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["pushbus"]"#),
        r#"the Dockerfile must have ENTRYPOINT ["pushbus"], compose commands are `run <service>`"#
    );

    let image = service(&services, SERVICES[0]).get("image").cloned();
    for name in SERVICES {
        let svc = service(&services, name);
        let context = match svc.get("build") {
            Some(Value::Mapping(b)) => {
                assert!(
                    b.get("dockerfile")
                        .is_none_or(|d| scalar(d) == "Dockerfile"),
                    "compose service `{name}` must build from the root Dockerfile"
                );
                b.get("context").map(scalar)
            }
            other => other.map(scalar),
        };
        assert!(
            matches!(context.as_deref(), Some("." | "./")),
            "compose service `{name}` must build the root Dockerfile (`build: .`), got {context:?}"
        );
        assert_eq!(
            svc.get("image").cloned(),
            image,
            "compose service `{name}` must use the same image as the others"
        );
    }
}

#[test]
fn compose_listen_addresses_bind_all_interfaces_and_are_published() {
    let services = compose_services();

    for name in SERVICES {
        let svc = service(&services, name);
        let env = environment(svc);
        for required in ["PUSHBUS_NATS_URL", "PUSHBUS_OPS_LISTEN"] {
            assert!(
                env.iter().any(|(k, _)| k == required),
                "compose service `{name}` must set {required}"
            );
        }

        let mut listen_ports = Vec::new();
        for (key, value) in env.iter().filter(|(k, _)| k.ends_with("_LISTEN")) {
            let addr: SocketAddr = value.parse().unwrap_or_else(|_| {
                panic!("compose service `{name}`: {key}={value} is not an ip:port")
            });
            assert!(
                addr.ip().is_unspecified(),
                "compose service `{name}`: {key}={value} must bind 0.0.0.0 to be reachable in a container"
            );
            listen_ports.push((key.as_str(), addr.port()));
        }

        let published = container_ports(svc);
        for port in &published {
            assert!(
                listen_ports.iter().any(|(_, p)| p == port),
                "compose service `{name}` publishes container port {port}, but listens on {listen_ports:?}"
            );
        }
        for (_, key) in PUBLIC_LISTEN.iter().filter(|(svc, _)| *svc == name) {
            let (_, port) = listen_ports
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("compose service `{name}` must set {key}"));
            assert!(
                published.contains(port),
                "compose service `{name}` listens on {port} ({key}) but does not publish it: {published:?}"
            );
        }
    }

    let nats_url = environment(service(&services, "nats-box"))
        .into_iter()
        .find(|(k, _)| k == "NATS_URL")
        .map(|(_, v)| v);
    assert_eq!(
        nats_url.as_deref(),
        Some("nats://nats:4222"),
        "nats-box must point NATS_URL at the nats service"
    );
    for name in SERVICES {
        let url = environment(service(&services, name))
            .into_iter()
            .find(|(k, _)| k == "PUSHBUS_NATS_URL")
            .map(|(_, v)| v);
        assert_eq!(
            url, nats_url,
            "compose service `{name}` must use the same NATS as nats-box"
        );
    }
}

/// The host side of a short `ports` entry, `${VAR:-default}` read as its default:
/// ("127.0.0.1", 9465) for "127.0.0.1:${FILTER_OPS_HOST_PORT:-9465}:9464".
fn host_binding(spec: &str) -> (String, u16) {
    let mut parts: Vec<String> = Vec::new();
    let mut rest = spec;
    // Split on the colons outside `${...}`.
    while !rest.is_empty() {
        if let Some(var) = rest.strip_prefix("${") {
            let end = var
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in `{spec}`"));
            let (_, default) = var[..end]
                .split_once(":-")
                .unwrap_or_else(|| panic!("`{spec}`: a host port variable needs a :-default"));
            parts
                .last_mut()
                .expect("variable after a colon")
                .push_str(default);
            rest = &var[end + 1..];
        } else if let Some(after) = rest.strip_prefix(':') {
            parts.push(String::new());
            rest = after;
        } else {
            let c = rest.chars().next().expect("non-empty");
            if parts.is_empty() {
                parts.push(String::new());
            }
            parts.last_mut().expect("a part").push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    assert_eq!(
        parts.len(),
        3,
        "ports entry `{spec}` must be HOST_IP:HOST_PORT:CONTAINER_PORT"
    );
    let port = parts[1]
        .parse()
        .unwrap_or_else(|_| panic!("ports entry `{spec}`: bad host port `{}`", parts[1]));
    (parts[0].clone(), port)
}

#[test]
fn compose_works_with_v1_29_publishes_on_loopback_and_pins_the_tests_nats() {
    let doc: Value = serde_norway::from_str(&repo_file("docker-compose.yml")).expect("valid YAML");
    for key in doc.as_mapping().expect("a mapping").keys().map(scalar) {
        assert!(
            key.starts_with("x-")
                || ["services", "volumes", "networks", "configs", "secrets"]
                    .contains(&key.as_str()),
            "top-level `{key}` in docker-compose.yml: docker-compose 1.29 refuses `name` \
             (and `version` only makes v2 warn)"
        );
    }

    let services = compose_services();
    let mut host_ports: Vec<(u16, String)> = Vec::new();
    for (name, svc) in &services {
        let name = scalar(name);
        for p in svc
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let (ip, port) = host_binding(&scalar(p));
            assert_eq!(
                ip,
                "127.0.0.1",
                "compose service `{name}` publishes `{}` beyond loopback",
                scalar(p)
            );
            if let Some((_, other)) = host_ports.iter().find(|(p, _)| *p == port) {
                panic!("host port {port} is published by both `{other}` and `{name}`");
            }
            host_ports.push((port, name.clone()));
        }
    }
    for name in SERVICES {
        let svc = service(&services, name);
        let ops: SocketAddr = environment(svc)
            .into_iter()
            .find(|(k, _)| k == "PUSHBUS_OPS_LISTEN")
            .map(|(_, v)| v.parse().expect("PUSHBUS_OPS_LISTEN is ip:port"))
            .unwrap_or_else(|| panic!("compose service `{name}` must set PUSHBUS_OPS_LISTEN"));
        assert!(
            container_ports(svc).contains(&ops.port()),
            "compose service `{name}` must publish its ops port {}",
            ops.port()
        );
    }

    let makefile = repo_file("Makefile");
    let version = makefile
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_VERSION := "))
        .expect("Makefile sets NATS_SERVER_VERSION")
        .trim();
    let image = |name: &str| service(&services, name).get("image").map(scalar);
    assert_eq!(
        image("nats").as_deref(),
        Some(format!("nats:{version}-alpine").as_str()),
        "the nats image must be the tests' nats-server version"
    );
    let nats_box = image("nats-box").unwrap_or_default();
    let tag = nats_box.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    assert!(
        !tag.is_empty() && tag != "latest",
        "nats-box must be pinned, got `{nats_box}`"
    );

    // The override only swaps images, so compose-test runs this file's own
    // ports, commands and healthchecks.
    let local: Value =
        serde_norway::from_str(&repo_file("deploy/compose-test/docker-compose.local.yml"))
            .expect("the override is valid YAML");
    let local = local
        .get("services")
        .and_then(Value::as_mapping)
        .expect("the override has services");
    for (name, svc) in local {
        let name = scalar(name);
        assert!(
            services.contains_key(name.as_str()),
            "the override names `{name}`, which docker-compose.yml does not have"
        );
        let keys: Vec<String> = svc
            .as_mapping()
            .expect("a service mapping")
            .keys()
            .map(scalar)
            .collect();
        assert_eq!(
            keys,
            ["image"],
            "the override may only swap `{name}`'s image"
        );
    }
}
