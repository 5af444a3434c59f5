//! Connecting to a secured NATS: seed lists, every authentication method,
//! TLS with client certificates (generated here, never committed), and
//! errors that name the server and the method but never the secret.

use std::path::{Path, PathBuf};
use std::process::Command;

use pushbus_shared::testkit::{NatsServer, free_port};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        use rcgen013::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pushbus test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("nats", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("pushbus", ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }

    /// The server's `tls { … }` block; `verify`: client certificates required.
    pub fn server_block(&self, verify: bool) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  timeout: 5\n}}\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }

    /// The client flags for mutual TLS.
    pub fn client_flags(&self) -> Vec<String> {
        vec![
            "--nats-tls-ca".into(),
            self.ca.display().to_string(),
            "--nats-tls-cert".into(),
            self.client_cert.display().to_string(),
            "--nats-tls-key".into(),
            self.client_key.display().to_string(),
        ]
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `pushbus <args>` with no PUSHBUS_* environment of its own.
fn pushbus(args: &[String]) -> (bool, String) {
    let out = Command::new(PUSHBUS)
        .args(args)
        .env_remove("PUSHBUS_NATS_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pushbus agents list` as user `svc` with the password in `password_file`;
/// the caller adds the TLS flags under test.
fn agents_list_as_svc(nats: &NatsServer, password_file: &std::path::Path) -> Vec<String> {
    let mut list = args(&[
        "agents",
        "list",
        "--nats-url",
        &nats.url(),
        "--nats-user",
        "svc",
    ]);
    list.extend([
        "--nats-password-file".into(),
        password_file.display().to_string(),
    ]);
    list
}

/// `pushbus agents list` against `url`, with the file `secret` passed as `flag`.
fn agents_list_with(url: &str, flag: &str, secret: &Path) -> (bool, String) {
    pushbus(&args(&[
        "agents",
        "list",
        "--nats-url",
        url,
        flag,
        &secret.display().to_string(),
    ]))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn mutual_tls_with_user_and_password_and_global_flags() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let nats = NatsServer::start_with_config(
        &format!(
            "{}authorization {{ users = [ {{ user: svc, password: \"pa55-word\" }} ] }}\n",
            pki.server_block(true)
        ),
        true,
    );
    let good = write(dir.path(), "pw", "pa55-word\n");
    let bad = write(dir.path(), "bad", "wrong-pa55\n");

    // Flags after the subcommand, as with `pushbus run`.
    let mut ok = agents_list_as_svc(&nats, &good);
    ok.extend(pki.client_flags());
    let (success, stderr) = pushbus(&ok);
    assert!(success, "{stderr}");

    // And before it.
    let mut before = args(&["--nats-url", &nats.url(), "--nats-user", "svc"]);
    before.extend(["--nats-password-file".into(), good.display().to_string()]);
    before.extend(pki.client_flags());
    before.extend(args(&["agents", "list"]));
    let (success, stderr) = pushbus(&before);
    assert!(success, "{stderr}");

    // A wrong password: the error names the server and the method, never
    // the password.
    let mut wrong = agents_list_as_svc(&nats, &bad);
    wrong.extend(pki.client_flags());
    let (success, stderr) = pushbus(&wrong);
    assert!(!success);
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", nats.port())),
        "{stderr}"
    );
    assert!(stderr.contains("user/password"), "{stderr}");
    assert!(stderr.contains("\"svc\""), "{stderr}");
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(!stderr.contains("wrong-pa55"), "{stderr}");

    // Without a client certificate the server refuses the TLS handshake.
    let mut no_cert = agents_list_as_svc(&nats, &good);
    no_cert.extend(["--nats-tls-ca".into(), pki.ca.display().to_string()]);
    let (success, stderr) = pushbus(&no_cert);
    assert!(!success, "connected without a client certificate");
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", nats.port())),
        "{stderr}"
    );

    // Without our CA the server's certificate is not trusted.
    let mut no_ca = agents_list_as_svc(&nats, &good);
    no_ca.extend([
        "--nats-tls-cert".into(),
        pki.client_cert.display().to_string(),
        "--nats-tls-key".into(),
        pki.client_key.display().to_string(),
    ]);
    let (success, _) = pushbus(&no_ca);
    assert!(!success, "trusted a server certificate from an unknown CA");
}

#[test]
fn token_nkey_and_seed_lists() {
    let dir = tempfile::tempdir().unwrap();
    let token_server =
        NatsServer::start_with_config("authorization { token: \"t0k3n-x\" }\n", false);
    let token = write(dir.path(), "token", "t0k3n-x\n");
    let blank = write(dir.path(), "blank", "  \n\t\n");
    let wrong = write(dir.path(), "wrong", "other\n");

    // A seed list whose first server is down still connects.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let seeds = format!("{dead}, {}", token_server.url());
    let (success, stderr) = agents_list_with(&seeds, "--nats-token-file", &token);
    assert!(success, "{stderr}");

    let (success, stderr) = agents_list_with(&token_server.url(), "--nats-token-file", &wrong);
    assert!(!success);
    assert!(stderr.contains("token"), "{stderr}");
    assert!(!stderr.contains("other"), "{stderr}");

    // An empty secret file is an error before anything connects.
    let (success, stderr) = agents_list_with(&token_server.url(), "--nats-token-file", &blank);
    assert!(!success);
    assert!(stderr.contains("is empty"), "{stderr}");

    // Credentials in the URL are refused, and not echoed.
    let (success, stderr) = pushbus(&args(&[
        "agents",
        "list",
        "--nats-url",
        &format!("nats://u:hunter2@127.0.0.1:{}", token_server.port()),
    ]));
    assert!(!success);
    assert!(stderr.contains("carries credentials"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // nkey: the server knows only the public key.
    let user = nkeys::KeyPair::new_user();
    let nkey_server = NatsServer::start_with_config(
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
        false,
    );
    let seed = write(dir.path(), "seed", &user.seed().unwrap());
    let (success, stderr) = agents_list_with(&nkey_server.url(), "--nats-nkey", &seed);
    assert!(success, "{stderr}");
    let other = write(
        dir.path(),
        "seed2",
        &nkeys::KeyPair::new_user().seed().unwrap(),
    );
    let (success, stderr) = agents_list_with(&nkey_server.url(), "--nats-nkey", &other);
    assert!(!success);
    assert!(stderr.contains("nkey"), "{stderr}");
}

#[test]
fn hook_ingest_refuses_unauthenticated_calls_off_loopback() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let blank = write(dir.path(), "blank", "\n \n");
    let run = |extra: &[&str]| {
        let mut child = Command::new(PUSHBUS)
            .args(["run", "hook-ingest", "--nats-url", &nats.url()])
            .args(["--ops-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--ingest-listen", &format!("0.0.0.0:{}", free_port())])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return Some((status.success(), err));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let (ok, err) = run(&[]).expect("hook-ingest kept running without a secret on 0.0.0.0");
    assert!(!ok);
    assert!(
        err.contains("refusing to accept unauthenticated calls"),
        "{err}"
    );
    let (ok, err) = run(&["--ingest-secret-file", &blank.display().to_string()])
        .expect("hook-ingest kept running with an empty secret");
    assert!(!ok);
    assert!(err.contains("is empty"), "{err}");
    // Told explicitly, it runs (and is still running when we stop looking).
    assert!(run(&["--ingest-insecure-no-auth"]).is_none());
}

/// A NATS JWT (v2) with `nats` as its claims' `nats` object, about `subject`,
/// signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut claims = serde_json::json!({
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let jti = hex::encode_upper(sha2::Sha256::digest(claims.to_string().as_bytes()));
    claims["jti"] = jti.into();
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// A `.creds` file's text: the user's JWT and nkey seed.
fn creds(jwt: &str, user: &nkeys::KeyPair) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

// Operator mode (decentralized JWT auth): the server trusts an operator, the
// account is preloaded, and pushbus connects with a user's `.creds` file.
// A user the account never signed is refused, and the seed never echoed.
#[test]
fn operator_mode_creds_connect_and_an_unsigned_user_is_refused() {
    let operator = nkeys::KeyPair::new_operator();
    let (account, system) = (nkeys::KeyPair::new_account(), nkeys::KeyPair::new_account());
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = |acct: &nkeys::KeyPair, name: &str, js: bool| {
        let mut limits = unlimited.clone();
        if !js {
            for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[k] = 0.into();
            }
        }
        nats_jwt(
            &operator,
            &acct.public_key(),
            name,
            serde_json::json!({"limits": limits, "type": "account", "version": 2}),
        )
    };
    let config = format!(
        "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
        nats_jwt(
            &operator,
            &operator.public_key(),
            "pushbus-test",
            serde_json::json!({"type": "operator", "version": 2}),
        ),
        system.public_key(),
        account.public_key(),
        account_jwt(&account, "pushbus", true),
        system.public_key(),
        account_jwt(&system, "SYS", false),
    );
    let nats = NatsServer::start_with_config(&config, false);
    let user_claims = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let signed = nats_jwt(&account, &user.public_key(), "svc", user_claims.clone());
    let good = write(dir.path(), "svc.creds", &creds(&signed, &user));
    let (success, stderr) = pushbus(&args(&[
        "setup",
        "--nats-url",
        &nats.url(),
        "--nats-creds",
        &good.display().to_string(),
    ]));
    assert!(success, "{stderr}");
    let (success, stderr) = agents_list_with(&nats.url(), "--nats-creds", &good);
    assert!(success, "{stderr}");

    // Without credentials, nothing.
    let (success, stderr) = pushbus(&args(&["agents", "list", "--nats-url", &nats.url()]));
    assert!(!success, "{stderr}");

    // Signed by an account the operator never issued.
    let stranger = nkeys::KeyPair::new_account();
    let intruder = nkeys::KeyPair::new_user();
    let forged = nats_jwt(&stranger, &intruder.public_key(), "svc", user_claims);
    let bad = write(dir.path(), "bad.creds", &creds(&forged, &intruder));
    let (success, stderr) = agents_list_with(&nats.url(), "--nats-creds", &bad);
    assert!(!success);
    assert!(stderr.to_lowercase().contains("authorization"), "{stderr}");
    assert!(!stderr.contains(&intruder.seed().unwrap()), "{stderr}");
}
