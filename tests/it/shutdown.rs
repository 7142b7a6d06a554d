//! Graceful shutdown of the real binary under load: SIGTERM with unary calls and streams in
//! flight, and a second signal that cuts the drain short.

use crate::common;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{BinaryServer, wait_for_calls_in_flight};
use greeter::pb::{HelloRequest, greeter_client::GreeterClient};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn config(dir: &tempfile::TempDir, shutdown: &str) -> PathBuf {
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        format!("[log]\nformat = \"json\"\nfilter = \"info\"\n\n[shutdown]\n{shutdown}\n"),
    )
    .unwrap();
    path
}

async fn channel(server: &BinaryServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

/// Sends SIGTERM and returns at once.
fn sigterm(server: &BinaryServer) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the process to exit: its code and when.
async fn wait_exit(server: &mut BinaryServer, limit: Duration) -> (Option<i32>, Instant) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return (status.code(), Instant::now());
        }
        assert!(Instant::now() < deadline, "did not exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_call_and_exits_zero_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(&config(&dir, "delay = \"1s\"\ngrace = \"5s\""), &[]);

    // Balancers learn NOT_SERVING from health and stop sending new calls; so do these clients.
    let not_serving = Arc::new(AtomicBool::new(false));
    let mut watch = HealthClient::new(channel(&server).await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let (ok, failed, in_flight, peak) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(channel(&server).await);
    }
    let callers: Vec<_> = (0..100)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            let (stop, ok, failed, in_flight, peak) = (
                not_serving.clone(),
                ok.clone(),
                failed.clone(),
                in_flight.clone(),
                peak.clone(),
            );
            tokio::spawn(async move {
                let mut client = GreeterClient::new(channel);
                while !stop.load(Ordering::SeqCst) {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    match client.say_hello(hello("load")).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(status) => {
                            eprintln!("unary call failed during shutdown: {status:?}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // A few chats that stay open: the drain must end them, with a clear status.
    let mut chats = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = GreeterClient::new(channel(&server).await)
            .say_hello_bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(hello("chat")).await.unwrap();
        assert_eq!(
            replies.message().await.unwrap().unwrap().message,
            "Hello, chat!"
        );
        chats.push((tx, replies));
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_before = ok.load(Ordering::SeqCst);
    let in_flight_at_sigterm = in_flight.load(Ordering::SeqCst);
    let signalled = Instant::now();
    sigterm(&server);

    // Health says NOT_SERVING first, while the listener still accepts (shutdown.delay).
    let update = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a health update within 5s")
        .unwrap()
        .unwrap();
    assert_eq!(update.status(), ServingStatus::NotServing);
    not_serving.store(true, Ordering::SeqCst);
    let seen_after = signalled.elapsed();
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_ok(),
        "the listener still accepts right after health turned NOT_SERVING"
    );

    for caller in callers {
        caller.await.unwrap();
    }
    for (tx, mut replies) in chats {
        let status = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("the stream ends within 5s")
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "server shutting down");
        drop(tx);
    }

    let (code, exited) = wait_exit(&mut server, Duration::from_secs(10)).await;
    let exit_after = exited - signalled;
    eprintln!(
        "shutdown figures: {calls_before} calls before SIGTERM, {in_flight_at_sigterm} in flight \
         at SIGTERM (peak {}), {} ok in total, {} failed; NOT_SERVING seen after {seen_after:?}; \
         exit {code:?} after {exit_after:?}",
        peak.load(Ordering::SeqCst),
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no unary call failed");
    // Calls were running when the signal came: the ones that must not fail. (A call still in
    // flight when the listener closes has a test of its own.)
    assert!(in_flight_at_sigterm > 0, "no call in flight at SIGTERM");
    assert!(
        calls_before > 100,
        "the server was under load: {calls_before} calls"
    );
    assert_eq!(code, Some(0));
    // delay (1s) + a fast drain; the grace (5s) bounds it from above.
    assert!(exit_after >= Duration::from_millis(900), "{exit_after:?}");
    assert!(exit_after < Duration::from_secs(6), "{exit_after:?}");
    let logs = server.logs.lock().unwrap();
    assert!(logs.contains("all calls finished"), "{logs}");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(&config(&dir, "delay = \"30s\"\ngrace = \"30s\""), &[]);
    sigterm(&server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.child.try_wait().unwrap().is_none(), "still draining");
    let second = Instant::now();
    sigterm(&server);
    let (code, exited) = wait_exit(&mut server, Duration::from_secs(5)).await;
    assert_eq!(code, Some(128 + 15));
    assert!(exited - second < Duration::from_secs(2));
}

#[tokio::test]
async fn the_drain_is_bounded_by_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    // A unary call whose request never ends cannot finish; a client that ignores GOAWAY keeps its
    // connection. Neither may keep the process alive past the grace, and the drain waits for the
    // call until then.
    let mut server = BinaryServer::start(&config(&dir, "delay = \"0s\"\ngrace = \"1s\""), &[]);
    let (client, _request) = h2_open_call(server.addr).await;
    wait_for_calls_in_flight(server.metrics_addr.unwrap(), 1.0).await;
    let signalled = Instant::now();
    sigterm(&server);
    let (code, exited) = wait_exit(&mut server, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", server.logs.lock().unwrap());
    let took = exited - signalled;
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    client.abort();
}

#[tokio::test]
async fn a_unary_call_in_flight_when_the_listener_closes_still_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(&config(&dir, "delay = \"300ms\"\ngrace = \"10s\""), &[]);
    let (client, (response, mut request)) = h2_open_call(server.addr).await;
    wait_for_calls_in_flight(server.metrics_addr.unwrap(), 1.0).await;
    sigterm(&server);
    // After shutdown.delay the listener closes (and connections get GOAWAY): connecting fails.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(server.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The call in flight keeps its slot through the drain (the grace is 10s) and finishes
    // normally.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.child.try_wait().unwrap().is_none(), "still draining");
    request
        .send_data(common::grpc_message("held"), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer within 5s")
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    assert!(bytes.ends_with(b"Hello, held!"), "{bytes:?}");
    let (code, _) = wait_exit(&mut server, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    client.abort();
}

type OpenCall = (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>);

/// A raw HTTP/2 connection with one SayHello call whose request body is not sent yet: the call
/// is in flight until the test sends it. Returns the connection's task and the call.
async fn h2_open_call(addr: std::net::SocketAddr) -> (tokio::task::JoinHandle<()>, OpenCall) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::post(format!("http://{addr}/helloworld.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let call = client.send_request(request, false).unwrap();
    (task, call)
}

#[tokio::test]
async fn greeter_health_exits_1_while_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(&config(&dir, "delay = \"30s\"\ngrace = \"1s\""), &[]);
    let health = |addr: String| {
        common::greeter_bin()
            .args(["health", "--addr", &addr, "--timeout", "5s"])
            .output()
            .unwrap()
    };
    let serving = health(server.addr_arg());
    assert_eq!(serving.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&serving.stdout), "SERVING\n");

    // SIGTERM: NOT_SERVING for shutdown.delay (30s) while the server still answers.
    sigterm(&server);
    let deadline = Instant::now() + Duration::from_secs(5);
    let output = loop {
        let output = health(server.addr_arg());
        if output.status.code() != Some(0) || Instant::now() > deadline {
            break output;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "greeter: not serving: \"\" is NOT_SERVING\n"
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "still answering"
    );
    sigterm(&server);
    let (code, _) = wait_exit(&mut server, Duration::from_secs(5)).await;
    assert_eq!(code, Some(128 + 15));
}

#[tokio::test]
async fn the_listener_closes_after_the_delay_and_server_streams_end_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        "[log]\nformat = \"json\"\n[shutdown]\ndelay = \"1s\"\ngrace = \"10s\"\n\
         [greeter]\nstream_interval = \"100ms\"\nstream_greetings = \
         [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\", \"h\", \"i\", \"j\", \"k\", \"l\", \
         \"m\", \"n\", \"o\", \"p\", \"q\", \"r\", \"s\", \"t\", \"u\", \"v\", \"w\", \"x\", \
         \"y\", \"z\"]\n",
    )
    .unwrap();
    let mut server = BinaryServer::start(&path, &[]);
    // A 2.5s stream, started before the signal.
    let mut replies = GreeterClient::new(channel(&server).await)
        .say_hello_stream_reply(hello("you"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "a, you!");

    let signalled = Instant::now();
    sigterm(&server);
    let deadline = signalled + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(server.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener is still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed_after = signalled.elapsed();
    assert!(
        closed_after >= Duration::from_secs(1) && closed_after < Duration::from_secs(2),
        "listener closed {closed_after:?} after SIGTERM, delay 1s"
    );

    // The stream delivered what it had sent, then ended with UNAVAILABLE, before its end (z).
    let mut received = vec!["a, you!".to_owned()];
    let status = loop {
        match replies.message().await {
            Ok(Some(reply)) => received.push(reply.message),
            Ok(None) => panic!("the stream completed: {received:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "server shutting down");
    assert!(received.len() >= 2, "{received:?}");
    let (code, _) = wait_exit(&mut server, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
}

/// The drain ends a server stream with UNAVAILABLE and counts it (the
/// `greeter_streams_ended_by_shutdown_total` series reads this counter).
#[tokio::test]
async fn a_stream_ended_by_the_drain_is_counted() {
    let mut server = common::TestServer::start_with(common::test_config(&[
        ("greeter.stream_interval", "200ms"),
        ("shutdown.delay", "0s"),
    ]))
    .await;
    let mut replies = GreeterClient::new(server.channel().await)
        .say_hello_stream_reply(HelloRequest { name: "you".into() })
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    assert_eq!(server.stats.calls.ended_by_shutdown(), 0);
    server.begin_shutdown();
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match replies.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream completed"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the drain ends the stream within 5s");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.stats.calls.ended_by_shutdown(), 1);
}
