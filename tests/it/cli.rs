//! The `greeter` binary across the process boundary: config errors and exit codes, the insecure
//! bind guard, the client subcommands against a served port, and SIGTERM.

use crate::common;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use crate::common::{BinaryServer, greeter_bin};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    greeter_bin()
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A tokens file entry for `token`, held by `name`, with the `greeter` scope.
fn tokens_entry(token: &str, name: &str) -> String {
    greeter::call::auth::entry_toml(&greeter::call::auth::entry_for(
        token,
        name,
        &["greeter".into()],
    ))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a config failure: exit 2 before binding anything, and a message naming file and key.
fn assert_config_error(args: &[&str], file: &str, key: &str) -> String {
    let output = run(args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains(file), "names the file {file:?}: {err}");
    assert!(
        err.contains(&format!("`{key}`")),
        "names the key {key:?}: {err}"
    );
    err
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = write(
        dir.path(),
        "unknown.toml",
        "[server]\nlisen = \"127.0.0.1:1\"\n",
    );
    let wrong_type = write(
        dir.path(),
        "type.toml",
        "[greeter]\nmax_name_bytes = \"lots\"\n",
    );
    let bad_addr = write(
        dir.path(),
        "addr.toml",
        "[server]\nlisten = \"localhost\"\n",
    );

    for (file, key) in [
        (&unknown, "server.lisen"),
        (&wrong_type, "greeter.max_name_bytes"),
        (&bad_addr, "server.listen"),
    ] {
        let path = file.to_str().unwrap();
        assert_config_error(&["serve", "--config", path], path, key);
        assert_config_error(&["config", "check", "-c", path], path, key);
    }
}

#[test]
fn later_files_win_and_errors_name_the_file_that_set_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let nine = write(dir.path(), "nine.toml", "[greeter]\nmax_name_bytes = 9\n");
    let seven = write(dir.path(), "seven.toml", "[greeter]\nmax_name_bytes = 7\n");
    let empty = write(
        dir.path(),
        "empty.toml",
        "[greeter]\nstream_greetings = []\n",
    );
    for (first, second, want) in [(&nine, &seven, 7), (&seven, &nine, 9)] {
        let shown = run(&[
            "config",
            "show",
            "-c",
            first.to_str().unwrap(),
            "-c",
            second.to_str().unwrap(),
        ]);
        assert!(shown.status.success(), "{}", stderr(&shown));
        assert!(
            stdout(&shown).contains(&format!("\nmax_name_bytes = {want}  # ")),
            "{}",
            stdout(&shown)
        );
    }

    let path = empty.to_str().unwrap();
    assert_config_error(
        &["config", "check", "-c", nine.to_str().unwrap(), "-c", path],
        path,
        "greeter.stream_greetings",
    );
}

/// Files for the precedence chain: each key is set by the layers that should lose to a later one.
fn layered_files(dir: &Path) -> [PathBuf; 2] {
    let earlier = write(
        dir,
        "earlier.toml",
        "[server]\nlisten = \"127.0.0.1:6001\"\n\
         [tls]\nhandshake_timeout = \"7s\"\n\
         [greeter]\nmax_name_bytes = 5\nstream_greetings = [\"Earlier\"]\n",
    );
    let later = write(
        dir,
        "later.toml",
        "[server]\nlisten = \"127.0.0.1:6002\"\n\
         [greeter]\nmax_name_bytes = 6\nstream_greetings = [\"Later\"]\n",
    );
    [earlier, later]
}

const LAYERED_ENV: [(&str, &str); 2] = [
    ("GREETER__SERVER__LISTEN", "127.0.0.1:6003"),
    ("GREETER__GREETER__MAX_NAME_BYTES", "7"),
];

#[test]
fn config_show_applies_default_then_files_in_order_then_env_then_listen() {
    let dir = tempfile::tempdir().unwrap();
    let [earlier, later] = layered_files(dir.path());
    let output = greeter_bin()
        .args(["config", "show", "-c"])
        .arg(&earlier)
        .arg("-c")
        .arg(&later)
        .args(["--listen", "127.0.0.1:6004"])
        .env_remove("RUST_LOG")
        .envs(LAYERED_ENV)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let shown: toml::Table = toml::from_str(&stdout(&output)).unwrap();
    // Set only by the default, by the earlier file, by both files, by files and env, by all.
    assert_eq!(shown["tls"]["reload_interval"].as_str(), Some("5s"));
    assert_eq!(shown["tls"]["handshake_timeout"].as_str(), Some("7s"));
    assert_eq!(
        shown["greeter"]["stream_greetings"].as_array().unwrap(),
        &vec![toml::Value::from("Later")]
    );
    assert_eq!(shown["greeter"]["max_name_bytes"].as_integer(), Some(7));
    assert_eq!(shown["server"]["listen"].as_str(), Some("127.0.0.1:6004"));
}

#[tokio::test]
async fn the_running_server_applies_the_same_precedence() {
    use greeter::pb::{HelloRequest, greeter_client::GreeterClient};

    let dir = tempfile::tempdir().unwrap();
    let [earlier, later] = layered_files(dir.path());
    // BinaryServer passes `--listen 127.0.0.1:0`: the server is reachable only if it wins.
    let server = BinaryServer::start_with_env(
        &json_log_config(dir.path(), ""),
        &[
            "-c",
            earlier.to_str().unwrap(),
            "-c",
            later.to_str().unwrap(),
        ],
        &LAYERED_ENV,
    );
    assert_ne!(server.addr.port(), 6001);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GreeterClient::new(channel);
    let hello = |name: &str| HelloRequest { name: name.into() };
    // max_name_bytes: 5 (earlier file) < 6 (later file) < 7 (environment).
    let reply = client.say_hello(hello("seven77")).await.unwrap();
    assert_eq!(reply.into_inner().message, "Hello, seven77!");
    let status = client.say_hello(hello("eight888")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // stream_greetings: the later file's.
    let mut replies = client
        .say_hello_stream_reply(hello("you"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        replies.message().await.unwrap().unwrap().message,
        "Later, you!"
    );
    assert!(replies.message().await.unwrap().is_none());
}

#[test]
fn malformed_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let broken = write(dir.path(), "broken.toml", "[server\nlisten = ");
    let path = broken.to_str().unwrap();
    let output = run(&["config", "check", "-c", path]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains(path) && stderr(&output).contains("not valid TOML"));

    let missing = dir.path().join("nope.toml");
    let path = missing.to_str().unwrap();
    let output = run(&["serve", "-c", path]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains(path) && stderr(&output).contains("not found"));
}

#[test]
fn config_check_checks_the_tls_and_token_files_too() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::generate_pki("client");
    let cert = write(dir.path(), "server.pem", &pki.server_cert);
    let key = write(dir.path(), "server.key", &pki.server_key);
    let tokens = write(dir.path(), "tokens.toml", &tokens_entry("t", "ops"));
    let secure = |cert: &Path, tokens: &Path| {
        format!(
            "[tls]\nenabled = true\ncert = {:?}\nkey = {:?}\n\
             [auth]\nenabled = true\ntokens_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            tokens.to_str().unwrap()
        )
    };
    let good = write(dir.path(), "good.toml", &secure(&cert, &tokens));
    let output = run(&["config", "check", "-c", good.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let missing_cert = dir.path().join("missing.pem");
    let config = write(dir.path(), "no-cert.toml", &secure(&missing_cert, &tokens));
    let output = run(&["config", "check", "-c", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("{}: cannot read", missing_cert.display())),
        "{}",
        stderr(&output)
    );

    let bad_tokens = write(dir.path(), "bad-tokens.toml", "[[tokens]\nname = ");
    let config = write(
        dir.path(),
        "bad-tokens-config.toml",
        &secure(&cert, &bad_tokens),
    );
    let output = run(&["config", "check", "-c", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!(
            "{}: not a valid tokens file",
            bad_tokens.display()
        )),
        "{}",
        stderr(&output)
    );
}

#[test]
fn errors_about_secret_files_name_file_line_and_column_never_the_content() {
    const SECRET: &str = "s3cr3t-0f-the-t3st";
    let dir = tempfile::tempdir().unwrap();
    let pki = common::generate_pki("client");
    let cert = write(dir.path(), "server.pem", &pki.server_cert);
    let key = write(dir.path(), "server.key", &pki.server_key);
    let tokens = write(dir.path(), "tokens.toml", &tokens_entry("t", "ops"));
    let check = |name: &str, config: String| {
        let config = write(dir.path(), name, &config);
        let output = run(&["config", "check", "-c", config.to_str().unwrap()]);
        assert!(!output.status.success(), "{name}");
        let err = stderr(&output);
        assert!(!err.contains(SECRET), "{name} echoes the secret: {err}");
        err
    };
    let secure = |key: &Path, tokens: &Path| {
        format!(
            "[tls]\nenabled = true\ncert = {:?}\nkey = {:?}\n\
             [auth]\nenabled = true\ntokens_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            tokens.to_str().unwrap()
        )
    };

    // A tokens file with a value where a hash should be, of the wrong type.
    let bad_tokens = write(
        dir.path(),
        "bad-tokens.toml",
        &format!("[[tokens]]\nname = \"ci\"\nsha256 = [\"{SECRET}\"]\nscopes = [\"greeter\"]\n"),
    );
    let err = check("tokens.toml.config", secure(&key, &bad_tokens));
    assert!(
        err.contains(&format!(
            "{}: not a valid tokens file: line 3, column 10",
            bad_tokens.display()
        )),
        "{err}"
    );

    // tracing.headers_file with an unquoted header value.
    let headers = write(
        dir.path(),
        "otlp-headers.toml",
        &format!("# collector credentials\nauthorization = Bearer {SECRET}\n"),
    );
    let err = check(
        "tracing.config",
        format!(
            "[tracing]\nenabled = true\nheaders_file = {:?}\n",
            headers.to_str().unwrap()
        ),
    );
    assert!(
        err.contains(&headers.display().to_string())
            && err.contains("line 2, column 17: string values must be quoted"),
        "{err}"
    );

    // A key file whose base64 is broken.
    let broken_key = write(
        dir.path(),
        "broken.key",
        &format!("-----BEGIN PRIVATE KEY-----\n{SECRET}!!\n-----END PRIVATE KEY-----\n"),
    );
    let err = check("key.config", secure(&broken_key, &tokens));
    assert!(
        err.contains(&format!(
            "{}: no PEM private key found: a PEM block is not valid base64",
            broken_key.display()
        )),
        "{err}"
    );
}

#[test]
fn every_configuration_failure_exits_2_and_a_taken_port_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let tokens = write(dir.path(), "tokens.toml", &tokens_entry("t", "ops"));
    let not_a_socket = write(dir.path(), "not-a-socket", "a regular file");
    let cases = [
        ("an unknown key", "[server]\nlisten_on = 1\n".to_owned()),
        (
            "a missing TLS certificate",
            format!("[tls]\nenabled = true\ncert = {missing:?}\nkey = {missing:?}\n"),
        ),
        (
            "a missing tokens file",
            format!("[auth]\nenabled = true\ntokens_file = {missing:?}\n"),
        ),
        (
            "a missing JWKS file",
            format!(
                "[auth]\nenabled = true\ntokens_file = {:?}\n[[auth.jwt.issuers]]\n\
                 issuer = \"https://issuer.example\"\njwks_file = {missing:?}\n\
                 audiences = [\"greeter\"]\n",
                tokens.to_str().unwrap()
            ),
        ),
        (
            "a missing tracing.headers_file",
            format!("[tracing]\nenabled = true\nheaders_file = {missing:?}\n"),
        ),
    ];
    for (what, text) in cases {
        let config = write(dir.path(), "case.toml", &text);
        for command in ["config check", "serve"] {
            let mut args: Vec<&str> = command.split(' ').collect();
            args.extend(["-c", config.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
            if command == "config check" {
                args.truncate(args.len() - 2);
            }
            let output = run(&args);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{what}, {command}: {}",
                stderr(&output)
            );
        }
    }
    // A path that is not a socket where the Unix socket goes: the config's to fix.
    let config = write(
        dir.path(),
        "unix.toml",
        &format!("[server]\nunix = {:?}\n", not_a_socket.to_str().unwrap()),
    );
    let output = run(&[
        "serve",
        "-c",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    // A port another process holds: the machine's to fix, not the config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(&["serve", "--listen", &addr]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("cannot listen on"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_address_without_a_port_is_named_not_dialed_on_port_80() {
    let output = run(&["hello", "--addr", "127.0.0.1", "--timeout", "2s"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("invalid server address \"127.0.0.1\": no port"),
        "{}",
        stderr(&output)
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "host.toml",
        "[server]\nlisten = \"localhost:6000\"\n",
    );
    let err = assert_config_error(
        &["config", "check", "-c", config.to_str().unwrap()],
        "host.toml",
        "server.listen",
    );
    assert!(err.contains("give e.g. 127.0.0.1:50051"), "{err}");
}

#[test]
fn a_relative_path_that_cannot_be_read_names_the_directory_it_was_read_from() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "secure.toml",
        "[tls]\nenabled = true\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\n",
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let output = greeter_bin()
        .args(["config", "check", "-c", config.to_str().unwrap()])
        .current_dir(elsewhere.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains(&format!(
            "certs/server.pem: cannot read: No such file or directory (os error 2) (a relative \
             path, read from the working directory {}",
            elsewhere.path().display()
        )),
        "{err}"
    );
}

#[test]
fn config_check_offline_checks_the_config_without_reading_the_files_it_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let production = root.join("config/production.toml");
    let jwt = root.join("deploy/k8s/overlays/prod/jwt.toml");
    let args = |offline: bool| {
        let mut args = vec!["config", "check"];
        if offline {
            args.push("--offline");
        }
        args.extend([
            "-c",
            production.to_str().unwrap(),
            "-c",
            jwt.to_str().unwrap(),
        ]);
        run(&args)
    };
    // The production files are Secret mounts in the pod, absent here.
    let online = args(false);
    assert_eq!(online.status.code(), Some(2), "{}", stderr(&online));
    assert!(
        stderr(&online).contains("/etc/greeter/tls/tls.crt"),
        "{}",
        stderr(&online)
    );
    let offline = args(true);
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert!(stdout(&offline).contains("the files it names were not read"));
    // Keys and values are still checked.
    let dir = tempfile::tempdir().unwrap();
    let typo = write(
        dir.path(),
        "typo.toml",
        "[tls]\nclient_auth = \"require\"\n",
    );
    let output = run(&["config", "check", "--offline", "-c", typo.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[tokio::test]
async fn jwt_keygen_and_mint_make_tokens_the_server_accepts_and_refuses_as_it_should() {
    use greeter::pb::{HelloRequest, greeter_client::GreeterClient};

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for (alg, kid) in [("EdDSA", "ed"), ("ES256", "es")] {
        let output = run(&[
            "jwt",
            "keygen",
            "--alg",
            alg,
            "--kid",
            kid,
            "--key",
            &path(&format!("{kid}.key")),
            "--jwks",
            &path(&format!("{kid}.json")),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(path("ed.key")).unwrap().permissions(),
    );
    assert_eq!(
        key_mode & 0o777,
        0o600,
        "the private key is the owner's only"
    );
    // Refuses to overwrite without --force.
    let again = run(&[
        "jwt",
        "keygen",
        "--key",
        &path("ed.key"),
        "--jwks",
        &path("ed.json"),
    ]);
    assert!(
        stderr(&again).contains("already exists; pass --force"),
        "{}",
        stderr(&again)
    );

    let mut config = common::config_with(vec![
        ("auth.enabled".into(), "true".into()),
        ("auth.tokens_file".into(), path("tokens.toml")),
    ]);
    std::fs::write(path("tokens.toml"), "").unwrap();
    config.auth.jwt.issuers = ["ed", "es"]
        .iter()
        .map(|kid| greeter::config::JwtIssuer {
            issuer: format!("https://{kid}.example"),
            jwks_file: path(&format!("{kid}.json")).into(),
            audiences: vec!["greeter".into()],
            scopes_claim: None,
        })
        .collect();
    config.auth.jwt.rules = ["ed", "es"]
        .iter()
        .map(|kid| greeter::config::ClaimRule {
            claim: "sub".into(),
            pattern: "system:serviceaccount:shop:*".into(),
            scopes: vec!["greeter".into()],
            issuer: Some(format!("https://{kid}.example")),
        })
        .collect();
    let server = common::TestServer::start_with(config).await;
    let call = |token: String| {
        let channel = server.channel();
        async move {
            let mut request = tonic::Request::new(HelloRequest { name: "jwt".into() });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            GreeterClient::new(channel.await)
                .say_hello(request)
                .await
                .map(|reply| reply.into_inner().message)
                .map_err(|status| status.code())
        }
    };
    let mint = |kid: &str, iss: &str, sub: &str, ttl: &str| {
        let output = run(&[
            "jwt",
            "mint",
            "--key",
            &path(&format!("{kid}.key")),
            "--kid",
            kid,
            "--iss",
            iss,
            "--sub",
            sub,
            "--aud",
            "greeter",
            "--ttl",
            ttl,
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output).trim().to_owned()
    };
    for kid in ["ed", "es"] {
        let iss = format!("https://{kid}.example");
        let token = mint(kid, &iss, "system:serviceaccount:shop:checkout", "10m");
        assert_eq!(call(token).await, Ok("Hello, jwt!".into()), "{kid}");
        // Another namespace: valid, but no rule grants it the scope.
        let token = mint(kid, &iss, "system:serviceaccount:web:front", "10m");
        assert_eq!(
            call(token).await,
            Err(tonic::Code::PermissionDenied),
            "{kid}"
        );
    }
    // Signed with one issuer's key, claiming the other issuer: its key is not in that set.
    let forged = mint(
        "ed",
        "https://es.example",
        "system:serviceaccount:shop:x",
        "10m",
    );
    assert_eq!(call(forged).await, Err(tonic::Code::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_followed_when_it_rotates_under_a_running_bench() {
    // The server accepts "first" until the rotation, then only "second"; the client's token
    // file changes at the same moment, as a kubelet's projected token does.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let entry = |token: &str| tokens_entry(token, "workload");
    std::fs::write(&tokens, entry("first")).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first\n").unwrap();
    let server = common::TestServer::start_with(common::config_with(vec![
        ("auth.enabled".into(), "true".into()),
        ("auth.tokens_file".into(), tokens.to_str().unwrap().into()),
        ("auth.reload_interval".into(), "50ms".into()),
        ("log.filter".into(), "warn".into()),
    ]))
    .await;
    let addr = server.addr.to_string();
    let bench = tokio::task::spawn_blocking({
        let token_file = token_file.clone();
        move || {
            run(&[
                "bench",
                "--addr",
                &addr,
                "--token-file",
                token_file.to_str().unwrap(),
                "--rate",
                "50",
                "--duration",
                "4s",
                "--warmup",
                "0s",
                "--connections",
                "1",
                "--concurrency",
                "4",
                "--json",
            ])
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&tokens, entry("second")).unwrap();
    std::fs::write(&token_file, "second\n").unwrap();
    let output = bench.await.unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let ok = report["status"]["OK"].as_u64().unwrap_or(0);
    let requests = report["requests"].as_u64().unwrap();
    println!("token file rotated at 1 s of 4 s: {ok} of {requests} calls OK");
    // Kept on the first token, every call after the rotation (about 3 s of 4) would fail; the
    // client follows the file within a second, so most calls succeed.
    assert!(ok * 2 > requests, "{report}");
}

#[tokio::test]
async fn a_refused_jwt_names_its_kind_in_the_access_line_never_the_token() {
    use greeter::pb::{HelloRequest, greeter_client::GreeterClient};

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let keygen = run(&[
        "jwt",
        "keygen",
        "--key",
        &path("jwt.key"),
        "--jwks",
        &path("jwks.json"),
    ]);
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    std::fs::write(path("tokens.toml"), "").unwrap();
    let config = json_log_config(
        dir.path(),
        &format!(
            "[auth]\nenabled = true\ntokens_file = {:?}\n[[auth.jwt.issuers]]\n\
             issuer = \"https://dev.example\"\njwks_file = {:?}\naudiences = [\"greeter\"]\n\
             [[auth.jwt.rules]]\nclaim = \"sub\"\npattern = \"*\"\nscopes = [\"greeter\"]\n",
            path("tokens.toml"),
            path("jwks.json")
        ),
    );
    let server = BinaryServer::start(&config, &[]);
    let mint = |iss: &str, aud: &str| {
        let output = run(&[
            "jwt",
            "mint",
            "--key",
            &path("jwt.key"),
            "--iss",
            iss,
            "--sub",
            "ci",
            "--aud",
            aud,
        ]);
        stdout(&output).trim().to_owned()
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kinds = Vec::new();
    for (token, kind) in [
        (mint("https://dev.example", "other"), "audience"),
        (mint("https://elsewhere.example", "greeter"), "issuer"),
    ] {
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
            .metadata_mut()
            .insert("x-request-id", kind.parse().unwrap());
        let refused = GreeterClient::new(channel.clone())
            .say_hello(request)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        kinds.push((token, kind));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = server.logs.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &serde_json::Value| e["target"] == "greeter::access")
            .collect();
        if lines.len() == kinds.len() {
            for (token, kind) in &kinds {
                let line = lines.iter().find(|l| l["request_id"] == *kind).unwrap();
                assert_eq!(line["refused"], *kind, "{line}");
                assert_eq!(line["auth"], "none", "{line}");
                assert!(!logs.contains(token.as_str()), "the token is never logged");
            }
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn environment_errors_name_the_variable() {
    let output = greeter_bin()
        .args(["config", "check"])
        .env("GREETER__GREETER__MAX_NAME_BYTES", "-3")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("GREETER__GREETER__MAX_NAME_BYTES"), "{err}");
}

#[test]
fn non_loopback_without_tls_and_auth_refuses_to_start_unless_opted_out() {
    let err = assert_config_error(
        &["serve", "--listen", "0.0.0.0:0"],
        "the command line",
        "server.listen",
    );
    assert!(err.contains("server.allow_insecure = true"), "{err}");
    assert!(
        err.contains("tls.enabled") && err.contains("auth.enabled"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let exposed = write(
        dir.path(),
        "exposed.toml",
        "[server]\nlisten = \"[::]:50051\"\n",
    );
    let path = exposed.to_str().unwrap();
    assert_config_error(&["config", "check", "-c", path], path, "server.listen");

    let opted_out = greeter_bin()
        .args(["config", "check", "-c", path])
        .env("GREETER__SERVER__ALLOW_INSECURE", "true")
        .output()
        .unwrap();
    assert!(opted_out.status.success(), "{}", stderr(&opted_out));
}

fn json_log_config(dir: &Path, extra: &str) -> PathBuf {
    write(
        dir,
        "server.toml",
        &format!("[log]\nformat = \"json\"\nfilter = \"info\"\n{extra}"),
    )
}

#[test]
fn client_subcommands_talk_to_a_served_binary_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = json_log_config(
        dir.path(),
        "[greeter]\nstream_interval = \"1ms\"\nstream_greetings = [\"Hello\", \"Hola\"]\n",
    );
    let mut server = BinaryServer::start(&config, &[]);
    let addr = server.addr_arg();

    let health = run(&["health", "--addr", &addr]);
    assert!(health.status.success(), "{}", stderr(&health));
    assert_eq!(stdout(&health), "SERVING\n");

    let hello = run(&["hello", "you", "--addr", &addr]);
    assert_eq!(stdout(&hello), "Hello, you!\n", "{}", stderr(&hello));
    let again = run(&["hello-again", "you", "--addr", &addr]);
    assert_eq!(stdout(&again), "Hello again, you!\n");
    let stream = run(&["stream", "you", "--addr", &addr]);
    assert_eq!(stdout(&stream), "Hello, you!\nHola, you!\n");

    let mut chat = greeter_bin()
        .args(["chat", "--addr", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"Ana\nBo\n").unwrap();
    let chat = chat.wait_with_output().unwrap();
    assert!(chat.status.success());
    assert_eq!(stdout(&chat), "Hello, Ana!\nHello, Bo!\n");

    let invalid = run(&["hello", "a\u{7}", "--addr", &addr]);
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stderr(&invalid).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&invalid)
    );

    let unknown = run(&["health", "no.such.Service", "--addr", &addr]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("NOT_FOUND"),
        "{}",
        stderr(&unknown)
    );

    let (code, took) = server.terminate();
    assert_eq!(code, Some(0), "logs:\n{}", server.logs.lock().unwrap());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let logs = server.logs.lock().unwrap();
    assert!(logs.contains("\"signal\":\"SIGTERM\""), "{logs}");
}

#[test]
fn client_timeout_reports_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    // Ten greetings a second apart: the stream cannot finish within the deadline.
    let config = json_log_config(dir.path(), "[greeter]\nstream_interval = \"1s\"\n");
    let server = BinaryServer::start(&config, &[]);
    let output = run(&[
        "stream",
        "you",
        "--addr",
        &server.addr_arg(),
        "--timeout",
        "300ms",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("DEADLINE_EXCEEDED"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        stdout(&output),
        "Hello, you!\n",
        "the first greeting came before the deadline"
    );
}

/// A `grpc-timeout` header as a duration (gRPC's `<digits><unit>` form).
fn grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("not a grpc-timeout: {value}"),
    }
}

#[tokio::test]
async fn client_timeout_is_sent_to_the_server_as_the_call_deadline() {
    // An HTTP/2 server that records the request headers and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        let (request, respond) = connection.accept().await.unwrap().unwrap();
        let _ = seen_tx.send(request.headers().clone());
        let _keep_open = respond;
        while connection.accept().await.is_some() {}
    });
    let output = tokio::task::spawn_blocking(move || {
        run(&["hello", "you", "--addr", &addr, "--timeout", "300ms"])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("DEADLINE_EXCEEDED"),
        "a server that never answers is the deadline, not a cancellation: {}",
        stderr(&output)
    );
    let headers = seen_rx.await.unwrap();
    let timeout = grpc_timeout(headers["grpc-timeout"].to_str().unwrap());
    assert!(
        timeout <= Duration::from_millis(300) && timeout > Duration::from_millis(200),
        "{timeout:?}"
    );
    server.abort();
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let output = run(&["hello", "--addr", "127.0.0.1:1", "--timeout", "2s"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("cannot connect to http://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
}

#[test]
fn help_and_version_are_complete() {
    let version = run(&["--version"]);
    let version = stdout(&version);
    let commit = version
        .strip_prefix(&format!("greeter {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("`greeter VERSION (commit ID)`: {version:?}"));
    // The id names a commit of this repository.
    let known = std::process::Command::new("git")
        .args(["cat-file", "-t", commit])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&known.stdout),
        "commit\n",
        "{version}"
    );
    for sub in [
        "serve",
        "hello",
        "hello-again",
        "stream",
        "chat",
        "health",
        "config",
    ] {
        let help = run(&[sub, "--help"]);
        assert!(help.status.success(), "{sub} --help");
        assert!(!stdout(&help).is_empty());
    }
    let serve = stdout(&run(&["serve", "--help"]));
    assert!(
        serve.contains("127.0.0.1:50051"),
        "serve --help states the default: {serve}"
    );
    let hello = stdout(&run(&["hello", "--help"]));
    assert!(
        hello.contains("[default: 127.0.0.1:50051]") && hello.contains("10s"),
        "{hello}"
    );
    // Unset, the variable is not "set to empty".
    let hello = greeter_bin()
        .args(["hello", "--help"])
        .env_remove("GREETER_ADDR")
        .output()
        .unwrap();
    let hello = stdout(&hello);
    assert!(
        hello.contains("[env: GREETER_ADDR]") && !hello.contains("GREETER_ADDR="),
        "{hello}"
    );
    let top = stdout(&run(&["--help"]));
    for sub in ["`bench`", "`certs`", "`token`", "`serve`", "`config`"] {
        let about = top.split("Usage:").next().unwrap();
        assert!(about.contains(sub), "the overview names {sub}: {top}");
    }
    let bench = stdout(&run(&["bench", "--help"]));
    let timeout = bench.split("--timeout").nth(1).unwrap();
    let timeout = timeout.split("\n\n").next().unwrap();
    assert!(
        !timeout.contains("chat") && timeout.contains("connection"),
        "{timeout}"
    );
}

#[test]
fn bench_counts_answers_by_status_code() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, "").unwrap();
    let config = json_log_config(
        dir.path(),
        &format!(
            "[auth]\nenabled = true\ntokens_file = {:?}\n",
            tokens.to_str().unwrap()
        ),
    );
    let server = BinaryServer::start(&config, &[]);
    let addr = server.addr_arg();
    let args = [
        "bench",
        "--addr",
        &addr,
        "--json",
        "--connections",
        "2",
        "--concurrency",
        "2",
        "--warmup",
        "0s",
        "--duration",
        "10s",
        "--requests",
        "200",
    ];
    // No token: every answer is UNAUTHENTICATED, and the report says so rather than "200 OK".
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], 0, "{report}");
    let refused = report["status"]["UNAUTHENTICATED"].as_u64().unwrap();
    assert!(refused >= 200, "{report}");
    assert_eq!(report["requests"].as_u64().unwrap(), refused);
}

#[test]
fn bench_measures_unary_and_bidi() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&json_log_config(dir.path(), ""), &[]);
    let addr = server.addr_arg();
    for rpc in ["unary", "bidi"] {
        let output = run(&[
            "bench",
            "--addr",
            &addr,
            "--rpc",
            rpc,
            "--json",
            "--warmup",
            "0s",
            "--duration",
            "10s",
            "--requests",
            "300",
            "--rate",
            "2000",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["mode"], "open");
        assert!(report["ok"].as_u64().unwrap() >= 300, "{report}");
        assert_eq!(
            report["status"].as_object().unwrap().len(),
            1,
            "only OK: {report}"
        );
        let p50 = report["latency_us"]["p50"].as_u64().unwrap();
        let max = report["latency_us"]["max"].as_u64().unwrap();
        assert!(p50 > 0 && p50 <= max, "{report}");
    }
}

#[test]
fn a_token_is_not_sent_in_cleartext_beyond_loopback_unless_allowed() {
    // 192.0.2.1 is TEST-NET-1: nothing answers there, so a refusal that comes at once was made
    // before connecting.
    let refused = run(&[
        "hello",
        "--addr",
        "192.0.2.1:50051",
        "--token",
        "secret",
        "--timeout",
        "2s",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains("cleartext") && err.contains("--allow-insecure-token"),
        "{err}"
    );
    assert!(!err.contains("secret"), "never echoes the token: {err}");

    let allowed = run(&[
        "hello",
        "--addr",
        "192.0.2.1:50051",
        "--token",
        "secret",
        "--timeout",
        "500ms",
        "--allow-insecure-token",
    ]);
    assert_eq!(allowed.status.code(), Some(1));
    assert!(
        stderr(&allowed).contains("cannot connect"),
        "{}",
        stderr(&allowed)
    );

    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&json_log_config(dir.path(), ""), &[]);
    for addr in [
        server.addr_arg(),
        format!("localhost:{}", server.addr.port()),
    ] {
        let loopback = run(&["hello", "you", "--addr", &addr, "--token", "secret"]);
        assert_eq!(stdout(&loopback), "Hello, you!\n", "{}", stderr(&loopback));
    }
}

#[test]
fn plaintext_and_tls_mismatches_say_what_the_server_speaks() {
    let pki = common::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let tls_toml: String = pki
        .tls_overrides()
        .iter()
        .filter(|(key, _)| key != "tls.reload_interval")
        .map(|(key, value)| format!("{} = {value:?}\n", key.trim_start_matches("tls.")))
        .collect();
    let tls_server = BinaryServer::start(
        &json_log_config(dir.path(), &format!("[tls]\n{tls_toml}")),
        &[],
    );
    let tls_addr = format!("localhost:{}", tls_server.addr.port());
    for extra in [&[][..], &["--token", "secret"][..]] {
        let output = run(&[&["hello", "--addr", &tls_addr][..], extra].concat());
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("the server speaks TLS: pass --ca"),
            "{extra:?}: {}",
            stderr(&output)
        );
    }

    // One sentence each, naming the flag, for the certificate mistakes.
    let other = common::Pki::new();
    for (args, says) in [
        (
            vec!["--ca".to_owned(), other.path("ca.pem")],
            "was not issued by the CA in --ca",
        ),
        (
            vec!["--tls".to_owned()],
            "pass --ca FILE with the CA that issued it",
        ),
        (
            vec![
                "--ca".to_owned(),
                pki.path("ca.pem"),
                "--server-name".to_owned(),
                "wrong.example".to_owned(),
            ],
            "not valid for the name dialed",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(&[&["hello", "--addr", &tls_addr][..], &args].concat());
        assert_eq!(output.status.code(), Some(1));
        let err = stderr(&output);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("invalid peer certificate"), "{args:?}: {err}");
    }
    // Plain HTTP to the TLS port: a readable 400, as Go's net/http answers.
    let answer = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(common::http_request(tls_server.addr, "GET", "/", None));
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.starts_with("this port speaks TLS"),
        "{}",
        answer.body
    );

    let plain_dir = tempfile::tempdir().unwrap();
    let plain_server = BinaryServer::start(&json_log_config(plain_dir.path(), ""), &[]);
    let plain_addr = format!("localhost:{}", plain_server.addr.port());
    let output = run(&["health", "--addr", &plain_addr, "--ca", &pki.path("ca.pem")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("the server speaks plaintext: drop --tls, --ca"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_stream_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = json_log_config(dir.path(), "[greeter]\nstream_interval = \"50ms\"\n");
    let server = BinaryServer::start(&config, &[]);
    // `greeter stream you | head -1`: the reader takes one line and goes away.
    let mut child = greeter_bin()
        .args(["stream", "you", "--addr", &server.addr_arg()])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "Hello, you!\n");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stderr(&output), "", "nothing on stderr");
}

#[test]
fn startup_and_shutdown_lines_hold_plain_values() {
    let dir = tempfile::tempdir().unwrap();
    let config = json_log_config(dir.path(), "[probe]\nlisten = \"127.0.0.1:0\"\n");
    let mut server = BinaryServer::start(&config, &[]);
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0));
    let logs = server.logs.lock().unwrap().clone();
    let line = |message: &str| -> serde_json::Value {
        logs.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line:\n{logs}"))
    };
    let serving = line("greeter serving");
    let probe: std::net::SocketAddr = serving["probe"].as_str().unwrap().parse().unwrap();
    assert!(probe.ip().is_loopback(), "{serving}");
    assert_eq!(serving["client_auth"], "none", "{serving}");
    assert_eq!(line("shutting down: health NOT_SERVING")["delay"], "0s");
    // No Rust debug text anywhere: Some(..), None, 0ns.
    for event in logs.lines() {
        assert!(
            !event.contains("Some(") && !event.contains("\"None\"") && !event.contains("0ns"),
            "{event}"
        );
    }

    let mut without_probe = BinaryServer::start(&json_log_config(dir.path(), ""), &[]);
    assert_eq!(without_probe.terminate().0, Some(0));
    let logs = without_probe.logs.lock().unwrap().clone();
    assert!(
        logs.contains("greeter serving") && !logs.contains("\"probe\""),
        "no probe listener, no probe field: {logs}"
    );
}

#[test]
fn two_servers_on_the_embedded_default_metrics_address_start_side_by_side() {
    // No metrics.listen override: the embedded default's, for both.
    let start = || {
        let mut child = greeter_bin()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .env_remove("GREETER__METRICS__LISTEN")
            .env("GREETER__LOG__FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let serving = std::io::BufRead::lines(stderr)
            .map_while(Result::ok)
            .find(|line| line.contains("greeter serving"))
            .unwrap_or_else(|| panic!("exited: {:?}", child.wait()));
        let event: serde_json::Value = serde_json::from_str(&serving).unwrap();
        let metrics: std::net::SocketAddr = event["metrics"].as_str().unwrap().parse().unwrap();
        (child, metrics)
    };
    let (mut first, first_metrics) = start();
    let (mut second, second_metrics) = start();
    for metrics in [first_metrics, second_metrics] {
        assert!(metrics.ip().is_loopback(), "{metrics}");
        assert_ne!(metrics.port(), 9090, "Prometheus's own port");
    }
    assert_ne!(first_metrics, second_metrics);
    for child in [&mut first, &mut second] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
