//! Per-caller quotas against a real server: a burst, then RESOURCE_EXHAUSTED with RetryInfo and
//! QuotaFailure decoded from the status details; buckets per caller, per method pattern and per
//! peer address; the probe port never counted. Rates are one token per 100s, so the test's own
//! pace cannot refill a bucket.

use std::time::Duration;

use greeter::{
    call::auth,
    config::{Config, Sources},
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt as _;

use crate::common::{TestServer, config_with, scrape};

/// A tokens file holding `alice` and `ci-bot`, both with the `greeter` scope.
fn tokens(dir: &std::path::Path) -> String {
    let path = dir.join("tokens.toml");
    let text: String = [("alice-token", "alice"), ("ci-bot-token", "ci-bot")]
        .iter()
        .map(|(token, name)| {
            auth::entry_toml(&auth::entry_for(token, name, &["greeter".into()])) + "\n"
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn hello(channel: &Channel, token: &str, again: bool) -> Result<(), Status> {
    let mut request = Request::new(HelloRequest { name: "q".into() });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut client = GreeterClient::new(channel.clone());
    if again {
        client.say_hello_again(request).await.map(drop)
    } else {
        client.say_hello(request).await.map(drop)
    }
}

/// `count` calls that must all pass, then one that must be refused; returns the refusal.
async fn burst_then_refused(channel: &Channel, token: &str, again: bool, count: usize) -> Status {
    for i in 0..count {
        if let Err(status) = hello(channel, token, again).await {
            panic!("call {i} of {token}'s burst of {count} refused: {status:?}");
        }
    }
    hello(channel, token, again)
        .await
        .expect_err("the call after the burst is refused")
}

/// The refusals of `class` on `method`: the one series of that class and method, which must be
/// exposed (every series exists from the start, at zero), so a renamed label cannot read as 0.
fn metric(text: &str, class: &str, method: &str) -> f64 {
    let series: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("greeter_quota_refused_total{"))
        .filter(|l| l.contains(&format!("class=\"{class}\"")))
        .filter(|l| l.contains(&format!("grpc_method=\"{method}\"")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .collect();
    assert_eq!(series.len(), 1, "one {class} series for {method}:\n{text}");
    series[0]
}

#[tokio::test]
async fn callers_get_their_burst_then_resource_exhausted_with_retry_info() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config_with(vec![
        ("auth.enabled".into(), "true".into()),
        ("auth.tokens_file".into(), tokens(dir.path())),
        ("probe.listen".into(), "127.0.0.1:0".into()),
        ("quota.enabled".into(), "true".into()),
        ("quota.rate".into(), "0.01".into()),
        ("quota.burst".into(), "3".into()),
        ("quota.identities.ci-bot.class".into(), "token".into()),
        ("quota.identities.ci-bot.rate".into(), "0.01".into()),
        ("quota.identities.ci-bot.burst".into(), "5".into()),
    ]))
    .await;
    let channel = server.channel().await;

    let refused = burst_then_refused(&channel, "alice-token", false, 3).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().starts_with(
            "over quota: quota of this caller: 0.01 calls per second, burst 3; retry in "
        ),
        "{refused:?}"
    );
    let details = refused.get_error_details();
    let delay = details.retry_info().unwrap().retry_delay.unwrap();
    // One token per 100s, and the bucket was just emptied.
    assert!(
        delay > Duration::from_secs(90) && delay <= Duration::from_secs(100),
        "{delay:?}"
    );
    let violations = &details.quota_failure().unwrap().violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].subject, "caller:token");
    assert!(
        violations[0].description.contains("burst 3"),
        "{violations:?}"
    );

    // ci-bot has a bucket of its own, of its own size; alice's stays empty.
    let refused = burst_then_refused(&channel, "ci-bot-token", false, 5).await;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let refused = hello(&channel, "alice-token", true).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // Health is open: counted per peer address, with the default size...
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..3 {
        health.check(HealthCheckRequest::default()).await.unwrap();
    }
    let refused = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused
            .get_error_details()
            .quota_failure()
            .unwrap()
            .violations[0]
            .subject,
        "caller:anonymous"
    );
    // ... but never on the probe port.
    let probe = Channel::from_shared(format!("http://{}", server.probe_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for _ in 0..10 {
        HealthClient::new(probe.clone())
            .check(HealthCheckRequest::default())
            .await
            .unwrap();
    }

    let text = scrape(server.metrics_addr.unwrap()).await;
    assert_eq!(metric(&text, "token", "SayHello"), 2.0, "{text}");
    assert_eq!(metric(&text, "token", "SayHelloAgain"), 1.0);
    assert_eq!(metric(&text, "anonymous", "Check"), 1.0);
    assert_eq!(metric(&text, "cert", "SayHello"), 0.0);
    // Nothing names a caller.
    assert!(!text.contains("alice") && !text.contains("ci-bot"));
}

#[tokio::test]
async fn a_method_pattern_adds_a_bucket_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    // Method patterns are not keys the command line can spell: a file, as operators write it.
    let file = dir.path().join("quota.toml");
    std::fs::write(
        &file,
        "[quota.methods.\"/helloworld.Greeter/SayHelloAgain\"]\nrate = 0.01\nburst = 2\n",
    )
    .unwrap();
    let config = Config::load(&Sources {
        files: vec![file],
        overrides: [
            ("server.listen", "127.0.0.1:0"),
            ("metrics.listen", "127.0.0.1:0"),
            ("auth.enabled", "true"),
            ("auth.tokens_file", &tokens(dir.path())),
            ("quota.enabled", "true"),
            ("quota.rate", "0.01"),
            ("quota.burst", "10"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Sources::default()
    })
    .unwrap();
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let refused = burst_then_refused(&channel, "alice-token", true, 2).await;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    assert_eq!(
        details.quota_failure().unwrap().violations[0].subject,
        "method:/helloworld.Greeter/SayHelloAgain"
    );
    // ci-bot has its own bucket for the method.
    hello(&channel, "ci-bot-token", true).await.unwrap();
    // The method's calls drew from alice's own bucket too: of its 10, 8 are left for the others.
    let refused = burst_then_refused(&channel, "alice-token", false, 8).await;
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused
            .get_error_details()
            .quota_failure()
            .unwrap()
            .violations[0]
            .subject,
        "caller:token"
    );
}

#[tokio::test]
async fn anonymous_callers_can_be_exempt() {
    let server_with = |anonymous: &str| {
        TestServer::start_with(config_with(vec![
            ("quota.enabled".into(), "true".into()),
            ("quota.rate".into(), "0.01".into()),
            ("quota.burst".into(), "1".into()),
            ("quota.anonymous".into(), anonymous.into()),
        ]))
    };
    let say_hello = async |client: &mut GreeterClient<Channel>| {
        client.say_hello(HelloRequest { name: "q".into() }).await
    };
    // The control: counted by peer, the same anonymous caller gets one call.
    let counted = server_with("peer").await;
    let mut client = GreeterClient::new(counted.channel().await);
    say_hello(&mut client).await.unwrap();
    let refused = say_hello(&mut client).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Exempt: never refused.
    let exempt = server_with("exempt").await;
    let mut client = GreeterClient::new(exempt.channel().await);
    for _ in 0..5 {
        say_hello(&mut client).await.unwrap();
    }
}
