//! What `[auth.jwt]` and `[[auth.cert_rules]]` must hold beyond their types, checked at load so a
//! mistake is a startup error naming the key, not a refused call later. (The JWKS files' contents
//! are checked when they load: [`super::jwks`].)

use std::collections::HashSet;

use crate::config::{CertRule, JwtConfig, Problem};

fn problem(key: &'static str, message: String) -> Problem {
    Problem { key, message }
}

fn blank(values: &[String]) -> bool {
    values.is_empty() || values.iter().any(|v| v.trim().is_empty())
}

pub fn jwt(config: &JwtConfig) -> Result<(), Problem> {
    const ISSUERS: &str = "auth.jwt.issuers";
    const RULES: &str = "auth.jwt.rules";
    const RATE: &str = "auth.jwt.peer_failure_rate";
    const BURST: &str = "auth.jwt.peer_failure_burst";
    // A budget that never refills would lock an address out of new JWTs for good after a few
    // bad ones; one of 0 would never verify a new JWT at all.
    if !(config.peer_failure_rate.is_finite() && config.peer_failure_rate >= 0.001) {
        return Err(problem(
            RATE,
            format!(
                "{RATE} = {} must be at least 0.001 (failed signature checks per second an \
                 address may force once its burst is spent)",
                config.peer_failure_rate
            ),
        ));
    }
    if config.peer_failure_burst == 0 {
        return Err(problem(
            BURST,
            format!("{BURST} must be at least 1: with 0 no new JWT would ever be verified"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, issuer) in config.issuers.iter().enumerate() {
        let at = format!("{ISSUERS}[{i}]");
        if issuer.issuer.trim().is_empty() {
            return Err(problem(ISSUERS, format!("{at}.issuer must not be empty")));
        }
        if !seen.insert(issuer.issuer.as_str()) {
            return Err(problem(
                ISSUERS,
                format!("{at}.issuer {:?} appears twice", issuer.issuer),
            ));
        }
        if issuer.jwks_file.as_os_str().is_empty() {
            return Err(problem(ISSUERS, format!("{at}.jwks_file must name a file")));
        }
        if blank(&issuer.audiences) {
            return Err(problem(
                ISSUERS,
                format!(
                    "{at}.audiences must list at least one non-empty audience (what the \
                     tokens' aud names, e.g. \"greeter\"): a token for another service must \
                     not be accepted here"
                ),
            ));
        }
        if issuer
            .scopes_claim
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(problem(
                ISSUERS,
                format!("{at}.scopes_claim must name a claim (\"scope\", \"scp\") or be left out"),
            ));
        }
    }
    for (i, rule) in config.rules.iter().enumerate() {
        let at = format!("{RULES}[{i}]");
        if rule.claim.trim().is_empty() || rule.pattern.is_empty() {
            return Err(problem(
                RULES,
                format!("{at}: claim and pattern must not be empty"),
            ));
        }
        if blank(&rule.scopes) {
            return Err(problem(
                RULES,
                format!("{at}.scopes must list at least one non-empty scope"),
            ));
        }
        if let Some(issuer) = &rule.issuer
            && !seen.contains(issuer.as_str())
        {
            return Err(problem(
                RULES,
                format!("{at}.issuer {issuer:?} is not one of auth.jwt.issuers"),
            ));
        }
    }
    // With one issuer a rule without `issuer` is that issuer's; with several, it would grant its
    // scopes to every issuer's tokens: `system:serviceaccount:shop:*` of one cluster would also
    // admit the `shop` namespace of any other cluster trusted here. Refused, not warned about: a
    // warning scrolls by while the grant is live.
    if config.issuers.len() > 1
        && let Some((i, rule)) = config
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.issuer.is_none())
    {
        return Err(problem(
            RULES,
            format!(
                "{RULES}[{i}] (claim {:?}, pattern {:?}) names no issuer while {} issuers are \
                 trusted: it would grant its scopes to the tokens of every one of them; set \
                 issuer = \"...\" on the rule (one rule per issuer that should match)",
                rule.claim,
                rule.pattern,
                config.issuers.len()
            ),
        ));
    }
    if !config.rules.is_empty() && config.issuers.is_empty() {
        return Err(problem(
            RULES,
            "rules without any [[auth.jwt.issuers]] grant nothing: add an issuer".to_owned(),
        ));
    }
    Ok(())
}

pub fn cert_rules(rules: &[CertRule]) -> Result<(), Problem> {
    const KEY: &str = "auth.cert_rules";
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{KEY}[{i}]");
        let patterns = [&rule.uri, &rule.dns, &rule.subject];
        let given: Vec<&String> = patterns.iter().filter_map(|p| p.as_ref()).collect();
        if given.len() != 1 || given[0].is_empty() {
            return Err(problem(
                KEY,
                format!("{at}: give exactly one non-empty pattern of uri, dns or subject"),
            ));
        }
        if blank(&rule.scopes) {
            return Err(problem(
                KEY,
                format!("{at}.scopes must list at least one non-empty scope"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClaimRule, JwtIssuer};

    fn issuer() -> JwtIssuer {
        JwtIssuer {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            jwks_file: "jwks.json".into(),
            audiences: vec!["greeter".into()],
            scopes_claim: None,
        }
    }

    fn rule() -> ClaimRule {
        ClaimRule {
            claim: "sub".into(),
            pattern: "system:serviceaccount:shop:*".into(),
            scopes: vec!["greeter".into()],
            issuer: None,
        }
    }

    fn jwt_problem(change: impl FnOnce(&mut JwtConfig)) -> Option<Problem> {
        let mut config = JwtConfig {
            issuers: vec![issuer()],
            rules: vec![rule()],
            ..JwtConfig::default()
        };
        change(&mut config);
        jwt(&config).err()
    }

    #[test]
    fn jwt_mistakes_name_the_key() {
        assert_eq!(jwt_problem(|_| {}), None);
        type Change = fn(&mut JwtConfig);
        let cases: [(Change, &str, &str); 13] = [
            (
                |c| c.issuers[0].audiences.clear(),
                "auth.jwt.issuers",
                "audiences",
            ),
            (
                |c| c.issuers[0].issuer.clear(),
                "auth.jwt.issuers",
                "issuer",
            ),
            (|c| c.issuers.push(issuer()), "auth.jwt.issuers", "twice"),
            (
                |c| c.issuers[0].scopes_claim = Some(" ".into()),
                "auth.jwt.issuers",
                "scopes_claim",
            ),
            (
                |c| c.rules[0].claim = " ".into(),
                "auth.jwt.rules",
                "claim and pattern",
            ),
            (
                |c| c.rules[0].pattern.clear(),
                "auth.jwt.rules",
                "claim and pattern",
            ),
            (|c| c.rules[0].scopes.clear(), "auth.jwt.rules", "scopes"),
            (
                |c| c.rules[0].issuer = Some("https://other".into()),
                "auth.jwt.rules",
                "not one of",
            ),
            (|c| c.issuers.clear(), "auth.jwt.rules", "add an issuer"),
            (
                |c| {
                    c.issuers.push(JwtIssuer {
                        issuer: "https://other-cluster".into(),
                        ..issuer()
                    });
                },
                "auth.jwt.rules",
                "auth.jwt.rules[0] (claim \"sub\", pattern \"system:serviceaccount:shop:*\") \
                 names no issuer while 2 issuers are trusted",
            ),
            (
                |c| c.peer_failure_rate = 0.0,
                "auth.jwt.peer_failure_rate",
                "at least 0.001",
            ),
            (
                |c| c.peer_failure_rate = f64::NAN,
                "auth.jwt.peer_failure_rate",
                "at least 0.001",
            ),
            (
                |c| c.peer_failure_burst = 0,
                "auth.jwt.peer_failure_burst",
                "at least 1",
            ),
        ];
        for (change, key, words) in cases {
            let problem = jwt_problem(change).expect(words);
            assert_eq!(problem.key, key);
            assert!(problem.message.contains(words), "{}", problem.message);
        }
    }

    #[test]
    fn rules_name_their_issuer_when_several_are_trusted() {
        let two = |rules: Vec<ClaimRule>| JwtConfig {
            issuers: vec![
                issuer(),
                JwtIssuer {
                    issuer: "https://other-cluster".into(),
                    ..issuer()
                },
            ],
            rules,
            ..JwtConfig::default()
        };
        let named = |iss: &str| ClaimRule {
            issuer: Some(iss.into()),
            ..rule()
        };
        let both = vec![
            named("https://kubernetes.default.svc.cluster.local"),
            named("https://other-cluster"),
        ];
        assert_eq!(jwt(&two(both.clone())), Ok(()));
        let mut one_unnamed = both;
        one_unnamed.push(rule());
        let problem = jwt(&two(one_unnamed)).unwrap_err();
        assert!(
            problem.message.starts_with("auth.jwt.rules[2] "),
            "{}",
            problem.message
        );
    }

    #[test]
    fn cert_rules_need_one_pattern_and_scopes() {
        let rule = |uri: Option<&str>, dns: Option<&str>, scopes: &[&str]| CertRule {
            uri: uri.map(Into::into),
            dns: dns.map(Into::into),
            subject: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        assert!(cert_rules(&[rule(Some("spiffe://x/*"), None, &["greeter"])]).is_ok());
        for bad in [
            rule(Some("a"), Some("b"), &["greeter"]),
            rule(None, None, &["greeter"]),
            rule(Some(""), None, &["greeter"]),
            rule(None, Some("*.svc"), &[]),
        ] {
            assert_eq!(cert_rules(&[bad]).unwrap_err().key, "auth.cert_rules");
        }
    }
}
