//! The log writer behind a reader that stops reading: a stuck collector, a full pipe.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use greeter::pb::{HelloRequest, greeter_client::GreeterClient};
use tonic::{Request, transport::Channel};

use crate::common::{BinaryServer, metric};

const DROPPED: &str = "greeter_log_lines_dropped_total";

/// Calls to make in one round, side by side.
const ROUND: usize = 500;

/// With stderr unread, calls go on as before: the pipe (64 KiB) and the writer's buffer (2 MiB,
/// ~6,500 access lines) fill, then each line is dropped and counted instead of making a call
/// wait. When the reader is back, lines are written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_costs_lines_never_calls() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\nfilter = \"info\"\n").unwrap();
    let server = BinaryServer::start(&config, &[]);
    let metrics = server.metrics_addr.expect("the metrics listener is on");
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello = || HelloRequest {
        name: "flood".into(),
    };
    GreeterClient::new(channel.clone())
        .say_hello(hello())
        .await
        .unwrap();
    assert_eq!(metric(metrics, DROPPED).await, 0.0);

    server.stall_logs(true);
    let mut calls = 0;
    while metric(metrics, DROPPED).await == 0.0 {
        // Three times what the pipe and the buffer hold, at the shortest access line.
        assert!(
            calls < 30_000,
            "no line dropped after {calls} calls with stderr unread"
        );
        let round = (0..ROUND).map(|_| {
            let mut client = GreeterClient::new(channel.clone());
            async move { client.say_hello(hello()).await }
        });
        // A call that waited for the log would never finish while stderr is unread.
        let replies = tokio::time::timeout(Duration::from_secs(60), join_all(round))
            .await
            .expect("calls do not wait for the log writer");
        for reply in replies {
            assert_eq!(reply.expect("served").into_inner().message, "Hello, flood!");
        }
        calls += ROUND;
    }

    // Reading again: the writer finishes the batch it was blocked on, then the buffer it filled
    // meanwhile, so a line logged at once may still be dropped; a marked call is repeated until
    // its line shows up.
    server.stall_logs(false);
    let mut client = GreeterClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut marked = Request::new(hello());
        marked
            .metadata_mut()
            .insert("x-request-id", "after-the-stall".parse().unwrap());
        client.say_hello(marked).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if server
            .logs
            .lock()
            .unwrap()
            .contains("\"request_id\":\"after-the-stall\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access line within a minute of reading stderr again"
        );
    }
}
