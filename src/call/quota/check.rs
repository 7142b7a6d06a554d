//! What `[quota]` may say: rates and bursts a bucket can have, named identities, method patterns
//! `MethodTable` understands, a bounded table. Each problem names its key.

use crate::{
    config::{Problem, QuotaConfig, QuotaLimits, Section},
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
        if self.max_callers == 0 {
            return Err(Problem {
                key: "quota.max_callers",
                message: "must be at least 1".into(),
            });
        }
        for (name, limits) in &self.identities {
            if name.trim().is_empty() {
                return Err(Problem {
                    key: "quota.identities",
                    message: "an identity name is empty".into(),
                });
            }
            let entry = format!("quota.identities.\"{name}\"");
            check_limits(limits, ["quota.identities"; 2], &entry)?;
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
    use crate::config::Config;

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
        let p = problem(|c| {
            c.identities.insert(
                "ci".into(),
                QuotaLimits {
                    rate: f64::NAN,
                    burst: 1,
                },
            );
        });
        assert!(
            p.message.starts_with("quota.identities.\"ci\".rate = NaN"),
            "{}",
            p.message
        );
        assert_eq!(config(0.001, 1_000_000).check(), Ok(()));
    }
}
