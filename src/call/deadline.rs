//! Call deadlines: what the client asked for (`grpc-timeout`), bounded by server policy.
//!
//! tonic reads `grpc-timeout` but answers an expired deadline with CANCELLED, and only until the
//! response headers are sent, so a stream outlives its deadline (tonic #1826, #936). greeter does
//! not hand `grpc-timeout` to tonic; [`crate::call::lifetime`] enforces the deadline computed here on every
//! call kind and answers DEADLINE_EXCEEDED, as every other gRPC stack does.

use std::time::Duration;

use tonic::codegen::http::HeaderMap;

use crate::{
    call::grpc_headers::GRPC_TIMEOUT,
    config::{DeadlineConfig, DeadlineLimits, Problem, Section},
    methods::{self, MethodTable},
};

/// Parses a `grpc-timeout` value: up to 8 ASCII digits and a unit (H, M, S, m, u, n), per the
/// gRPC over HTTP/2 spec. `None` for anything else; a malformed header is treated as absent.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Bytes, not chars: a multi-byte last character is no unit (and no place to split a `str`).
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |amount, digit| amount * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl Section for DeadlineConfig {
    /// `deadline.methods` patterns are checked like `auth.policy`'s, by one parser.
    fn check(&self) -> Result<(), Problem> {
        for pattern in self.methods.keys() {
            if let Err(problem) = methods::check_pattern(pattern) {
                return Err(Problem {
                    key: "deadline.methods",
                    message: format!("deadline.methods.\"{pattern}\": {problem}"),
                });
            }
        }
        Ok(())
    }
}

/// The server's deadline rules, per method.
#[derive(Debug, Clone)]
pub struct DeadlinePolicy {
    all: DeadlineLimits,
    /// Per-method and per-service overrides (`deadline.methods`).
    overrides: MethodTable<DeadlineLimits>,
}

impl DeadlinePolicy {
    pub fn new(config: &DeadlineConfig) -> Self {
        Self {
            all: DeadlineLimits {
                default: config.default,
                max: config.max,
            },
            overrides: MethodTable::new(
                config
                    .methods
                    .iter()
                    .map(|(pattern, limits)| (pattern.clone(), limits.clone())),
            ),
        }
    }

    /// The limits of calls to `path`, which [`crate::call::resolve`] looks up once per method.
    pub fn limits(&self, path: &str) -> &DeadlineLimits {
        self.overrides.specific(path).unwrap_or(&self.all)
    }

    /// The per-method and per-service overrides.
    pub fn overrides(&self) -> &MethodTable<DeadlineLimits> {
        &self.overrides
    }
}

/// How long a call may run: the client's `grpc-timeout`, or the method's default when it sent
/// none, capped at the method's maximum. A limit of zero means "none".
pub fn budget(limits: &DeadlineLimits, headers: &HeaderMap) -> Option<Duration> {
    let asked = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let wanted = asked.or(nonzero(limits.default));
    match (wanted, nonzero(limits.max)) {
        (Some(wanted), Some(max)) => Some(wanted.min(max)),
        (Some(wanted), None) => Some(wanted),
        (None, max) => max,
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    /// Found by `fuzz/fuzz_targets/timeouts.rs`: a value ending in a multi-byte character used to
    /// panic splitting the `str` inside it. Headers reach the parser only as visible ASCII, but
    /// the function is public and takes any `str`.
    #[test]
    fn a_multi_byte_last_character_is_no_unit() {
        for bad in ["\u{e9}", "5\u{e9}", "/5\u{717}", " 9\u{1dd}"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    fn policy() -> DeadlinePolicy {
        let mut methods = BTreeMap::new();
        methods.insert(
            "/helloworld.Greeter/SayHelloBidiStream".to_owned(),
            DeadlineLimits {
                default: Duration::ZERO,
                max: Duration::from_secs(3600),
            },
        );
        methods.insert(
            "/grpc.health.v1.Health/*".to_owned(),
            DeadlineLimits {
                default: Duration::ZERO,
                max: Duration::ZERO,
            },
        );
        DeadlinePolicy::new(&DeadlineConfig {
            default: Duration::from_secs(30),
            max: Duration::from_secs(300),
            methods,
        })
    }

    impl DeadlinePolicy {
        /// The budget of a call to `path`, its limits looked up as the resolver does.
        fn budget(&self, path: &str, headers: &HeaderMap) -> Option<Duration> {
            budget(self.limits(path), headers)
        }
    }

    fn headers(timeout: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(t) = timeout {
            headers.insert("grpc-timeout", t.parse().unwrap());
        }
        headers
    }

    #[test]
    fn default_applies_without_a_client_deadline_and_max_caps_it() {
        let p = policy();
        let hello = "/helloworld.Greeter/SayHello";
        assert_eq!(
            p.budget(hello, &headers(None)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p.budget(hello, &headers(Some("5S"))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            p.budget(hello, &headers(Some("1H"))),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            p.budget(hello, &headers(Some("junk"))),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn per_method_and_per_service_overrides() {
        let p = policy();
        let chat = "/helloworld.Greeter/SayHelloBidiStream";
        assert_eq!(
            p.budget(chat, &headers(None)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            p.budget(chat, &headers(Some("2H"))),
            Some(Duration::from_secs(3600))
        );
        let watch = "/grpc.health.v1.Health/Watch";
        assert_eq!(p.budget(watch, &headers(None)), None);
        assert_eq!(
            p.budget(watch, &headers(Some("1S"))),
            Some(Duration::from_secs(1))
        );
    }
}
