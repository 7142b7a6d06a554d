//! What `[quota]` may say: rates and bursts a bucket can have, named identities, method patterns
//! `MethodTable` understands, a bounded table. Each problem names its key.

use std::collections::HashMap;

use crate::{
    config::{IdentityClass, Problem, QuotaConfig, QuotaLimits, Section},
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
    use crate::config::{Config, IdentityQuota};

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
