//! The Unix domain socket listener: a real socket file in a temporary directory, its mode, calls
//! and auth over it, the `greeter` CLI as a sidecar would use it, and cleanup at shutdown.

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::common::{TestServer, config_with, greeter_bin, greeter_token_auth};
use greeter::{
    pb::{HelloRequest, greeter_client::GreeterClient},
    server::Server,
};
use hyper_util::rt::TokioIo;
use tokio_stream::StreamExt as _;
use tonic::{
    Code, Request,
    transport::{Channel, Endpoint},
};

fn unix_config(path: &Path, extra: Vec<(String, String)>) -> greeter::config::Config {
    let mut overrides = vec![
        ("server.unix".into(), path.to_str().unwrap().into()),
        ("server.unix_mode".into(), "0660".into()),
    ];
    overrides.extend(extra);
    config_with(overrides)
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connect to the Unix socket")
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

#[tokio::test]
async fn the_socket_serves_every_kind_of_call_and_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greeter.sock");
    let config = unix_config(&path, vec![]);
    let greetings = config.greeter.stream_greetings.clone();
    let server = TestServer::start_with(config).await;

    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut client = GreeterClient::new(unix_channel(path.clone()).await);
    let reply = client.say_hello(hello("sidecar")).await.unwrap();
    assert_eq!(reply.into_inner().message, "Hello, sidecar!");
    // Every greeting of the default list, in order, and a stream that ends with OK.
    let streamed: Vec<String> = client
        .say_hello_stream_reply(hello("sidecar"))
        .await
        .unwrap()
        .into_inner()
        .map(|reply| reply.unwrap().message)
        .collect()
        .await;
    let expected: Vec<String> = greetings
        .iter()
        .map(|greeting| format!("{greeting}, sidecar!"))
        .collect();
    assert_eq!(expected.len(), 10);
    assert_eq!(streamed, expected);
    let requests = tokio_stream::iter([hello("a"), hello("b")]);
    let replies: Vec<_> = client
        .say_hello_bidi_stream(requests)
        .await
        .unwrap()
        .into_inner()
        .map(|reply| reply.unwrap().message)
        .collect()
        .await;
    assert_eq!(replies, ["Hello, a!", "Hello, b!"]);

    // The TCP listener serves alongside.
    let mut tcp = GreeterClient::new(server.channel().await);
    assert!(tcp.say_hello(hello("tcp")).await.is_ok());

    // The CLI, as a sidecar or an exec probe would call it.
    let addr = format!("unix:{}", path.display());
    let out = tokio::task::spawn_blocking(move || {
        greeter_bin()
            .args(["hello", "--addr", &addr, "cli"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Hello, cli!");

    server.stop().await.unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn auth_applies_on_the_socket_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greeter.sock");
    let auth = greeter_token_auth(dir.path(), "grt_sidecar-token", "sidecar");
    let _server = TestServer::start_with(unix_config(&path, auth)).await;
    let mut client = GreeterClient::new(unix_channel(path).await);

    let status = client.say_hello(hello("anon")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut request = Request::new(hello("sidecar"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer grt_sidecar-token".parse().unwrap());
    assert!(client.say_hello(request).await.is_ok());
}

#[tokio::test]
async fn socket_callers_share_one_quota_bucket_per_uid() {
    // A bucket of one call: this process's call on one connection takes it; another process of
    // the same user (the CLI), on a connection of its own, finds it empty; a TCP caller has its
    // own bucket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greeter.sock");
    let quota = [
        ("quota.enabled", "true"),
        ("quota.rate", "0.01"),
        ("quota.burst", "1"),
    ];
    let server = TestServer::start_with(unix_config(
        &path,
        quota
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ))
    .await;
    let mut client = GreeterClient::new(unix_channel(path.clone()).await);
    assert!(client.say_hello(hello("first")).await.is_ok());

    let addr = format!("unix:{}", path.display());
    let out = tokio::task::spawn_blocking(move || {
        greeter_bin()
            .args(["hello", "--addr", &addr, "cli"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over quota"), "{stderr}");

    let mut tcp = GreeterClient::new(server.channel().await);
    assert!(tcp.say_hello(hello("tcp")).await.is_ok());
}

#[tokio::test]
async fn a_file_in_the_way_or_a_live_server_stops_startup_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greeter.sock");

    std::fs::write(&path, "not a socket").unwrap();
    let err = Server::bind(unix_config(&path, vec![]))
        .await
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(message.contains("server.unix"), "{message}");
    assert!(message.contains("not a socket"), "{message}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");

    std::fs::remove_file(&path).unwrap();
    let _running = TestServer::start_with(unix_config(&path, vec![])).await;
    let err = Server::bind(unix_config(&path, vec![]))
        .await
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(message.contains("another server is listening"), "{message}");
}

#[test]
fn config_check_catches_a_missing_socket_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("run").join("greeter.sock");
    for command in [&["config", "check"][..], &["serve"][..]] {
        let output = greeter_bin()
            .args(command)
            .env("GREETER__SERVER__UNIX", &missing)
            .env("GREETER__SERVER__LISTEN", "127.0.0.1:0")
            .env("GREETER__METRICS__LISTEN", "")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {err}");
        assert!(
            err.contains("`server.unix`")
                && err.contains(&format!("{}", dir.path().join("run").display())),
            "{command:?}: {err}"
        );
    }
    let present = greeter_bin()
        .args(["config", "check"])
        .env("GREETER__SERVER__UNIX", dir.path().join("greeter.sock"))
        .output()
        .unwrap();
    assert!(present.status.success(), "{present:?}");
}
