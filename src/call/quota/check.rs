//! What `[quota]` may say: rates and bursts a bucket can have, named identities, method patterns
//! `MethodTable` understands, a bounded table. Each problem names its key.

use std::{collections::HashMap, time::Duration};

use crate::{
    config::{
        IdentityClass, Problem, QuotaConfig, QuotaLimits, QuotaStore, RedisQuotaConfig, Section,
    },
    methods,
};

/// Bounds of `rate`: below, a bucket times a large burst overflows governor's nanosecond
/// arithmetic; above, a token would take less than a nanosecond.
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1e9;
const MAX_BURST: u32 = 1_000_000;

impl Section for QuotaConfig {
    /// Rates and bursts a bucket can have, identities named, method patterns `MethodTable`
    /// understands, a bounded table.
    fn check(&self) -> Result<(), Problem> {
        let default = QuotaLimits {
            rate: self.rate,
            burst: self.burst,
        };
        check_limits(&default, ["quota.rate", "quota.burst"], "quota")?;
        for (key, value) in [
            ("quota.max_callers", self.max_callers),
            ("quota.anonymous_max_callers", self.anonymous_max_callers),
        ] {
            if value == 0 {
                return Err(Problem {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        let mut seen = HashMap::new();
        for (key, identity) in &self.identities {
            let entry = format!("quota.identities.\"{key}\"");
            let problem = |message: String| Problem {
                key: "quota.identities",
                message: format!("{entry}: {message}"),
            };
            let name = identity.name.as_deref().unwrap_or(key);
            if name.trim().is_empty() {
                return Err(problem("the identity's name is empty".into()));
            }
            match (identity.class, identity.issuer.as_deref()) {
                (IdentityClass::Jwt, None | Some("")) => {
                    return Err(problem(
                        "a JWT identity names its issuer (issuer = \"...\", the tokens' iss): \
                         one subject from two issuers is two callers"
                            .into(),
                    ));
                }
                (IdentityClass::Token | IdentityClass::Cert, Some(_)) => {
                    return Err(problem(
                        "issuer is for JWT identities only (class = \"jwt\")".into(),
                    ));
                }
                _ => {}
            }
            let whole = (identity.class, identity.issuer.as_deref(), name);
            if let Some(other) = seen.insert(whole, key) {
                return Err(problem(format!(
                    "names the same identity as quota.identities.\"{other}\""
                )));
            }
            check_limits(&identity.limits(), ["quota.identities"; 2], &entry)?;
        }
        if self.store == QuotaStore::Redis {
            check_redis(&self.redis)?;
        }
        for (pattern, limits) in &self.methods {
            let entry = format!("quota.methods.\"{pattern}\"");
            if let Err(problem) = methods::check_pattern(pattern) {
                return Err(Problem {
                    key: "quota.methods",
                    message: format!("{entry}: {problem}"),
                });
            }
            check_limits(limits, ["quota.methods"; 2], &entry)?;
        }
        Ok(())
    }
}

/// The longest `quota.redis.timeout`: every call waits up to it while Redis is slow.
const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// A URL the client can dial, with no secret in it, and a timeout a call can afford.
fn check_redis(redis: &RedisQuotaConfig) -> Result<(), Problem> {
    let problem = |key, message: String| Err(Problem { key, message });
    let Ok(url) = url::Url::parse(&redis.url) else {
        return problem(
            "quota.redis.url",
            format!(
                "{:?} is not a URL: give redis://host:port or rediss://host:port",
                redis.url
            ),
        );
    };
    let tls = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        other => {
            return problem(
                "quota.redis.url",
                format!("scheme {other:?}: give redis:// or rediss:// (TLS)"),
            );
        }
    };
    if url.host_str().is_none_or(str::is_empty) {
        return problem("quota.redis.url", "names no host".into());
    }
    if url.password().is_some() {
        // Not even echoed: the URL is in the config, which `config show` prints whole.
        return problem(
            "quota.redis.url",
            "holds a password: put it in a file named by quota.redis.password_file".into(),
        );
    }
    if !tls && !redis.ca_file.as_os_str().is_empty() {
        return problem(
            "quota.redis.ca_file",
            "applies to rediss:// (TLS) only; the url is redis://".into(),
        );
    }
    if redis.timeout.is_zero() || redis.timeout > MAX_REDIS_TIMEOUT {
        return problem(
            "quota.redis.timeout",
            format!(
                "{:?}: give a duration above zero and at most {MAX_REDIS_TIMEOUT:?} (every call \
                 may wait this long while Redis is slow), e.g. \"20ms\"",
                redis.timeout
            ),
        );
    }
    if redis.key_prefix.is_empty() {
        return problem(
            "quota.redis.key_prefix",
            "must not be empty: keys of other users of the Redis could collide".into(),
        );
    }
    Ok(())
}

/// `keys`: the keys to name for a bad rate and a bad burst.
fn check_limits(
    limits: &QuotaLimits,
    [rate_key, burst_key]: [&'static str; 2],
    entry: &str,
) -> Result<(), Problem> {
    let problem = |key, message| Err(Problem { key, message });
    if !(MIN_RATE..=MAX_RATE).contains(&limits.rate) {
        return problem(
            rate_key,
            format!(
                "{entry}.rate = {}: give calls per second between {MIN_RATE} and {MAX_RATE:e} (a \
             quota of 0 calls would refuse every call; to count nothing, set quota.enabled = false)",
                limits.rate
            ),
        );
    }
    if !(1..=MAX_BURST).contains(&limits.burst) {
        return problem(
            burst_key,
            format!(
                "{entry}.burst = {}: give the calls allowed at once, between 1 and {MAX_BURST}",
                limits.burst
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, IdentityQuota, QuotaStore};

    fn config(rate: f64, burst: u32) -> QuotaConfig {
        QuotaConfig {
            enabled: true,
            rate,
            burst,
            ..Config::embedded().quota
        }
    }

    #[test]
    fn bad_quotas_name_their_key() {
        let problem = |edit: fn(&mut QuotaConfig)| {
            let mut config = config(1.0, 1);
            edit(&mut config);
            config.check().unwrap_err()
        };
        let p = problem(|c| c.rate = 0.0);
        assert_eq!(p.key, "quota.rate");
        assert!(p.message.starts_with("quota.rate = 0:"), "{}", p.message);
        let p = problem(|c| c.burst = 0);
        assert_eq!(p.key, "quota.burst");
        assert!(p.message.starts_with("quota.burst = 0:"), "{}", p.message);
        assert_eq!(problem(|c| c.max_callers = 0).key, "quota.max_callers");
        let p = problem(|c| {
            c.methods.insert(
                "/a.S".into(),
                QuotaLimits {
                    rate: 1.0,
                    burst: 1,
                },
            );
        });
        assert_eq!(p.key, "quota.methods");
        assert_eq!(
            problem(|c| c.anonymous_max_callers = 0).key,
            "quota.anonymous_max_callers"
        );
        let p = problem(|c| {
            c.identities
                .insert("ci".into(), identity(IdentityClass::Token, None, f64::NAN));
        });
        assert!(
            p.message.starts_with("quota.identities.\"ci\".rate = NaN"),
            "{}",
            p.message
        );
        assert_eq!(config(0.001, 1_000_000).check(), Ok(()));
    }

    #[test]
    fn a_redis_store_needs_a_url_without_secrets_and_a_short_timeout() {
        let problem = |edit: fn(&mut RedisQuotaConfig)| {
            let mut config = config(1.0, 1);
            config.store = QuotaStore::Redis;
            edit(&mut config.redis);
            config.check().err().map(|p| (p.key, p.message))
        };
        assert_eq!(problem(|_| {}), None);
        assert_eq!(
            problem(|r| r.url = "rediss://cache.internal:6380/2".into()),
            None
        );
        for (edit, key, fragment) in [
            (
                (|r: &mut RedisQuotaConfig| r.url = "cache:6379".into()) as fn(&mut _),
                "quota.redis.url",
                "scheme",
            ),
            (
                |r| r.url = "http://cache:6379".into(),
                "quota.redis.url",
                "give redis:// or rediss://",
            ),
            (
                |r| r.url = "redis://:s3cr3t@cache:6379".into(),
                "quota.redis.url",
                "password_file",
            ),
            (
                |r| r.ca_file = "ca.pem".into(),
                "quota.redis.ca_file",
                "rediss://",
            ),
            (
                |r| r.timeout = Duration::ZERO,
                "quota.redis.timeout",
                "above zero",
            ),
            (
                |r| r.timeout = Duration::from_secs(5),
                "quota.redis.timeout",
                "at most 1s",
            ),
            (|r| r.key_prefix.clear(), "quota.redis.key_prefix", "empty"),
        ] {
            let (k, message) = problem(edit).expect(key);
            assert_eq!(k, key, "{message}");
            assert!(message.contains(fragment), "{message}");
            assert!(!message.contains("s3cr3t"), "{message}");
        }
        // The local store ignores [quota.redis].
        let mut config = config(1.0, 1);
        config.redis.url = "nonsense".into();
        assert_eq!(config.check(), Ok(()));
    }

    fn identity(class: IdentityClass, issuer: Option<&str>, rate: f64) -> IdentityQuota {
        IdentityQuota {
            class,
            issuer: issuer.map(Into::into),
            name: None,
            rate,
            burst: 1,
        }
    }

    #[test]
    fn identities_are_whole() {
        let problem = |entries: Vec<(&str, IdentityQuota)>| {
            let mut config = config(1.0, 1);
            config.identities = entries.into_iter().map(|(k, v)| (k.into(), v)).collect();
            config.check().err().map(|p| (p.key, p.message))
        };
        let (key, message) =
            problem(vec![("sa", identity(IdentityClass::Jwt, None, 1.0))]).unwrap();
        assert_eq!(key, "quota.identities");
        assert!(
            message.starts_with("quota.identities.\"sa\": a JWT identity names its issuer"),
            "{message}"
        );
        let (_, message) = problem(vec![(
            "ci",
            identity(IdentityClass::Cert, Some("https://east"), 1.0),
        )])
        .unwrap();
        assert!(
            message.contains("issuer is for JWT identities only"),
            "{message}"
        );
        // One name, two issuers (or two classes): two identities, both allowed.
        let east = identity(IdentityClass::Jwt, Some("https://east"), 1.0);
        let west = identity(IdentityClass::Jwt, Some("https://west"), 1.0);
        let named = |mut quota: IdentityQuota| {
            quota.name = Some("sa".into());
            quota
        };
        assert_eq!(
            problem(vec![
                ("east", named(east.clone())),
                ("west", named(west)),
                ("sa", identity(IdentityClass::Token, None, 1.0)),
            ]),
            None
        );
        // The same whole identity twice is refused, naming both entries.
        let (_, message) = problem(vec![("east", named(east.clone())), ("sa", east)]).unwrap();
        assert!(
            message.contains("names the same identity as quota.identities.\"east\""),
            "{message}"
        );
        assert_eq!(config(0.001, 1_000_000).check(), Ok(()));
    }
}
