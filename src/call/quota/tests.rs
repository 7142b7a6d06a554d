//! The bucket tables, without a server: bursts, refusals, overflow, overrides, forgetting.

use std::net::SocketAddr;

use tonic::Code;
use tonic_types::StatusExt as _;

use super::{layer::refusal, *};
use crate::{
    config::{Config, IdentityQuota},
    transport::listener::PeerAddr,
};

fn config(rate: f64, burst: u32) -> QuotaConfig {
    QuotaConfig {
        enabled: true,
        rate,
        burst,
        max_callers: 2,
        ..Config::embedded().quota
    }
}

fn quotas(config: &QuotaConfig) -> Quotas {
    let refusals = QuotaRefusals::register(&mut Default::default(), CLASSES, &[]);
    Quotas::new(config, refusals)
}

fn peer(addr: &str) -> PeerInfo {
    PeerInfo::new(PeerAddr::Tcp(addr.parse::<SocketAddr>().unwrap()), None)
}

#[test]
fn keys_are_small() {
    // What ops::memory counts per tracked caller assumes a 16-byte key.
    assert_eq!(std::mem::size_of::<Key>(), 16);
}

#[test]
fn a_burst_then_a_refusal_that_says_when_to_retry() {
    let quotas = quotas(&QuotaConfig {
        max_callers: 8,
        ..config(0.01, 2)
    });
    let caller = Caller::Token("ci".into());
    let identity = identify(Some(&caller), None, &quotas.hasher);
    let emptied = std::time::Instant::now();
    assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()));
    assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()));
    let refused = quotas.admit(&identity, "/a.S/M").unwrap_err();
    let since = emptied.elapsed();
    assert_eq!(refused.pattern, None);
    // One token every 100s, the first due 100s after the bucket was emptied: however long the
    // calls took on a loaded machine, the wait is the rest of that.
    let period = Duration::from_secs(100);
    assert!(refused.retry_after <= period, "{refused:?}");
    assert!(
        refused.retry_after + since >= period,
        "{refused:?} after {since:?}"
    );

    // Another holder, a certificate and JWTs of the same name, have buckets of their own;
    // one subject from two issuers is two callers.
    let other = Caller::Token("other".into());
    let cert = Caller::ClientCert("ci".into());
    let jwt = |issuer: &str| Caller::Jwt {
        subject: "ci".into(),
        issuer: issuer.into(),
    };
    let (east, west) = (jwt("https://east"), jwt("https://west"));
    for caller in [&other, &cert, &east, &west] {
        let identity = identify(Some(caller), None, &quotas.hasher);
        assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()), "{caller:?}");
        assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()), "{caller:?}");
    }
}

#[test]
fn anonymous_callers_are_counted_by_address_and_ipv6_by_64() {
    let quotas = quotas(&config(0.01, 1));
    let admit = |addr: &str| {
        let peer = peer(addr);
        let identity = identify(Some(&Caller::Anonymous), Some(&peer), &quotas.hasher);
        quotas.admit(&identity, "/a.S/M").is_ok()
    };
    assert!(admit("10.0.0.1:1000"));
    assert!(!admit("10.0.0.1:2000"), "same address, another port");
    assert!(admit("[2001:db8::1]:1"));
    assert!(!admit("[2001:db8::2]:1"), "same /64");
    assert!(admit("[2001:db8:0:1::1]:1"), "the next /64");
}

#[test]
fn a_full_table_puts_newcomers_in_one_shared_bucket() {
    let quotas = quotas(&config(0.01, 1));
    let admit = |name: &str| {
        let caller = Caller::Token(name.into());
        let identity = identify(Some(&caller), None, &quotas.hasher);
        quotas.admit(&identity, "/a.S/M").is_ok()
    };
    assert!(quotas.default.named.limiter.is_empty());
    assert!(admit("a"));
    assert!(admit("b"));
    assert_eq!(quotas.default.named.limiter.len(), 2);
    assert!(!quotas.default.named.limiter.is_empty());
    // max_callers = 2: c takes the overflow bucket's one token, d finds it empty.
    assert!(admit("c"));
    assert!(!admit("d"));
    assert_eq!(quotas.default.named.limiter.len(), 2);
}

#[test]
fn callers_whose_bucket_is_full_again_are_forgotten() {
    let caller = Caller::Token("ci".into());
    // One token every 100s: the bucket stays short of full, the caller is kept.
    let slow = quotas(&config(0.01, 1));
    let identity = identify(Some(&caller), None, &slow.hasher);
    assert_eq!(slow.admit(&identity, "/a.S/M"), Ok(()));
    slow.forget_idle();
    assert_eq!(slow.default.named.limiter.len(), 1);
    // One token every 10ms: full again 10ms after the call, and forgotten.
    let fast = quotas(&config(100.0, 1));
    let identity = identify(Some(&caller), None, &fast.hasher);
    assert_eq!(fast.admit(&identity, "/a.S/M"), Ok(()));
    std::thread::sleep(Duration::from_millis(30));
    fast.forget_idle();
    assert_eq!(fast.default.named.limiter.len(), 0);
}

#[tokio::test]
async fn forgetting_runs_in_the_background() {
    let fast = Arc::new(quotas(&config(100.0, 1)));
    let caller = Caller::Token("ci".into());
    let identity = identify(Some(&caller), None, &fast.hasher);
    assert_eq!(fast.admit(&identity, "/a.S/M"), Ok(()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let stop = CancellationToken::new();
    // The first round is at once; the next FORGET_INTERVAL later.
    fast.spawn_forgetting(stop.clone());
    tokio::time::timeout(Duration::from_secs(10), async {
        while !fast.default.named.limiter.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the idle caller forgotten");
    assert_eq!(fast.default.named.limiter.len(), 0);
    stop.cancel();
}

#[test]
fn method_and_identity_overrides_have_their_own_buckets() {
    let mut config = config(0.01, 1);
    config.identities.insert(
        "ci".into(),
        IdentityQuota {
            class: IdentityClass::Token,
            issuer: None,
            name: None,
            rate: 0.01,
            burst: 3,
        },
    );
    config.methods.insert(
        "/a.S/Slow".into(),
        QuotaLimits {
            rate: 0.01,
            burst: 1,
        },
    );
    let quotas = quotas(&config);
    let caller = Caller::Token("ci".into());
    let ci = identify(Some(&caller), None, &quotas.hasher);
    assert_eq!(quotas.admit(&ci, "/a.S/Slow"), Ok(()));
    let refused = quotas.admit(&ci, "/a.S/Slow").unwrap_err();
    assert_eq!(refused.pattern.as_deref(), Some("/a.S/Slow"));
    // ci's own bucket (burst 3) gave one token to the first call: two are left.
    assert_eq!(quotas.admit(&ci, "/a.S/Fast"), Ok(()));
    assert_eq!(quotas.admit(&ci, "/a.S/Fast"), Ok(()));
    let refused = quotas.admit(&ci, "/a.S/Fast").unwrap_err();
    assert_eq!((refused.pattern, refused.limits.burst), (None, 3));
}

#[test]
fn a_caller_refusal_still_spends_its_method_token() {
    // The method's bucket (2) is larger than the caller's (1): the second call is refused by the
    // caller's bucket, and the third by the method's, which that refusal emptied.
    let mut config = config(0.01, 1);
    config.methods.insert(
        "/a.S/Slow".into(),
        QuotaLimits {
            rate: 0.01,
            burst: 2,
        },
    );
    let quotas = quotas(&config);
    let caller = Caller::Token("ci".into());
    let ci = identify(Some(&caller), None, &quotas.hasher);
    assert_eq!(quotas.admit(&ci, "/a.S/Slow"), Ok(()));
    let refused = quotas.admit(&ci, "/a.S/Slow").unwrap_err();
    assert_eq!((refused.pattern, refused.limits.burst), (None, 1));
    let refused = quotas.admit(&ci, "/a.S/Slow").unwrap_err();
    assert_eq!(refused.pattern.as_deref(), Some("/a.S/Slow"));
}

#[test]
fn anonymous_peers_never_crowd_callers_with_credentials() {
    let quotas = quotas(&QuotaConfig {
        anonymous_max_callers: 3,
        ..config(0.01, 1)
    });
    let anonymous = |addr: &str| {
        let peer = peer(addr);
        let identity = identify(Some(&Caller::Anonymous), Some(&peer), &quotas.hasher);
        quotas.admit(&identity, "/a.S/M").is_ok()
    };
    // Three peers fill the anonymous table, the fourth empties its overflow bucket, the
    // fifth finds it empty.
    for addr in ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"] {
        assert!(anonymous(addr), "{addr}");
    }
    assert!(!anonymous("10.0.0.5:1"));
    assert_eq!(quotas.default.anonymous.limiter.len(), 3);
    assert_eq!(quotas.default.anonymous.overflowed(), 2);
    // Callers with credentials have a table of their own, untouched.
    for name in ["a", "b"] {
        let caller = Caller::Token(name.into());
        let identity = identify(Some(&caller), None, &quotas.hasher);
        assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()), "{name}");
    }
    assert_eq!(quotas.default.named.limiter.len(), 2);
    assert_eq!(quotas.default.named.overflowed(), 0);
}

#[test]
fn an_override_names_a_whole_identity() {
    let mut config = config(0.01, 1);
    config.identities.insert(
        "east-sa".into(),
        IdentityQuota {
            class: IdentityClass::Jwt,
            issuer: Some("https://east".into()),
            name: Some("sa".into()),
            rate: 0.01,
            burst: 3,
        },
    );
    let quotas = quotas(&config);
    let admitted = |caller: &Caller| {
        let identity = identify(Some(caller), None, &quotas.hasher);
        (0..4)
            .take_while(|_| quotas.admit(&identity, "/a.S/M").is_ok())
            .count()
    };
    let jwt = |issuer: &str| Caller::Jwt {
        subject: "sa".into(),
        issuer: issuer.into(),
    };
    // The override's issuer gets its burst of 3; the same subject from another issuer, and a
    // token holder of that name, get the default's 1 each, from buckets of their own.
    assert_eq!(admitted(&jwt("https://east")), 3);
    assert_eq!(admitted(&jwt("https://west")), 1);
    assert_eq!(admitted(&Caller::Token("sa".into())), 1);
}

#[test]
fn the_refusal_carries_retry_info_and_quota_failure() {
    let refused = Refused {
        pattern: None,
        limits: QuotaLimits {
            rate: 2.0,
            burst: 4,
        },
        retry_after: Duration::from_millis(250),
    };
    let status = refusal(&refused, Class::Token);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "over quota: quota of this caller: 2 calls per second, burst 4; retry in 0.250s"
    );
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().unwrap().retry_delay,
        Some(Duration::from_millis(250))
    );
    let violation = &details.quota_failure().unwrap().violations[0];
    assert_eq!(violation.subject, "caller:token");
}
