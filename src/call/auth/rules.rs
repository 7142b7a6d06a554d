//! Identity -> scopes: rules over a JWT's claims (`[[auth.jwt.rules]]`) and over a client
//! certificate's names (`[[auth.cert_rules]]`). Every matching rule adds its scopes.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::{
    config::{CertRule, ClaimRule},
    transport::tls::ClientIdentity,
};

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also none, also
/// `/` and `:`) and everything else matches itself. The one pattern language of the identity
/// rules: `system:serviceaccount:shop:*`, `spiffe://cluster.local/ns/shop/*`, `*.shop.svc`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        // No `*`: the whole text.
        return rest.is_empty();
    };
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Adds to `scopes` those of the rules a token's `claims` match; `issuer` is the token's.
pub fn claim_scopes(
    rules: &[ClaimRule],
    issuer: &str,
    claims: &Map<String, Value>,
    scopes: &mut Vec<String>,
) {
    for rule in rules {
        if rule.issuer.as_deref().is_some_and(|i| i != issuer) {
            continue;
        }
        let matches = match claims.get(&rule.claim) {
            Some(Value::String(value)) => glob(&rule.pattern, value),
            Some(Value::Array(values)) => values
                .iter()
                .any(|v| v.as_str().is_some_and(|v| glob(&rule.pattern, v))),
            _ => false,
        };
        if matches {
            add(scopes, &rule.scopes);
        }
    }
}

/// Adds the scopes a `scope` (space-separated string) or `scp` (array) claim lists.
pub fn listed_scopes(claim: Option<&Value>, scopes: &mut Vec<String>) {
    match claim {
        Some(Value::String(list)) => {
            for scope in list.split_whitespace() {
                add(scopes, &[scope.to_owned()]);
            }
        }
        Some(Value::Array(list)) => {
            for scope in list.iter().filter_map(Value::as_str) {
                add(scopes, &[scope.to_owned()]);
            }
        }
        _ => {}
    }
}

/// The scopes of a client certificate: those of every rule it matches, or `fallback`
/// (`auth.client_cert_scopes`) when it matches none.
pub fn cert_scopes<'a>(
    rules: &[CertRule],
    cert: &ClientIdentity,
    fallback: &'a [String],
) -> Cow<'a, [String]> {
    let mut scopes = Vec::new();
    let mut matched = false;
    for rule in rules {
        let hit = if let Some(pattern) = &rule.uri {
            sans(cert, "uri:").any(|uri| glob(pattern, uri))
        } else if let Some(pattern) = &rule.dns {
            sans(cert, "dns:").any(|dns| glob(pattern, dns))
        } else {
            rule.subject
                .as_deref()
                .is_some_and(|pattern| glob(pattern, &cert.subject))
        };
        if hit {
            matched = true;
            add(&mut scopes, &rule.scopes);
        }
    }
    if matched {
        Cow::Owned(scopes)
    } else {
        Cow::Borrowed(fallback)
    }
}

/// Who a certificate is, for logs: its first URI SAN (a SPIFFE ID, when a mesh issued it), else
/// its subject.
pub fn cert_identity(cert: &ClientIdentity) -> String {
    sans(cert, "uri:")
        .next()
        .map_or_else(|| cert.subject.clone(), str::to_owned)
}

fn sans<'a>(cert: &'a ClientIdentity, kind: &'a str) -> impl Iterator<Item = &'a str> {
    cert.sans
        .iter()
        .filter_map(move |san| san.strip_prefix(kind))
}

fn add(scopes: &mut Vec<String>, new: &[String]) {
    for scope in new {
        if !scopes.contains(scope) {
            scopes.push(scope.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn glob_matches_stars_anywhere() {
        let sa = "system:serviceaccount:shop:checkout";
        assert!(glob("system:serviceaccount:shop:*", sa));
        assert!(glob("*", sa));
        assert!(glob(sa, sa));
        assert!(glob("system:*:shop:*", sa));
        assert!(glob("*checkout", sa));
        assert!(!glob("system:serviceaccount:shop", sa));
        assert!(!glob("system:serviceaccount:shopping:*", sa));
        assert!(!glob("system:serviceaccount:shop:*x", sa));
        assert!(!glob("a*a", "a"));
        assert!(glob("a*a", "aa"));
        // Text a middle part matched is used up: it cannot match the next part too.
        assert!(!glob("*:shop:*:shop", "ns:shop"));
        assert!(glob("*:shop:*:shop", "ns:shop:sa:shop"));
        assert!(glob(
            "spiffe://cluster.local/ns/*/sa/web",
            "spiffe://cluster.local/ns/a/sa/web"
        ));
        assert!(!glob(
            "spiffe://cluster.local/ns/*/sa/web",
            "spiffe://cluster.local/ns/a/sa/api"
        ));
    }

    fn rule(claim: &str, pattern: &str, scope: &str, issuer: Option<&str>) -> ClaimRule {
        ClaimRule {
            claim: claim.into(),
            pattern: pattern.into(),
            scopes: vec![scope.into()],
            issuer: issuer.map(Into::into),
        }
    }

    #[test]
    fn claim_rules_add_scopes_once() {
        let rules = [
            rule("sub", "system:serviceaccount:shop:*", "greeter", None),
            rule("sub", "*:checkout", "greeter", None),
            rule("groups", "admins", "reflection", None),
            rule("sub", "*", "other", Some("https://elsewhere")),
        ];
        let claims =
            json!({"sub": "system:serviceaccount:shop:checkout", "groups": ["dev", "admins"]});
        let mut scopes = vec![];
        claim_scopes(
            &rules,
            "https://k8s",
            claims.as_object().unwrap(),
            &mut scopes,
        );
        assert_eq!(scopes, ["greeter", "reflection"]);
        // The issuer-restricted rule applies to its own issuer's tokens.
        let mut scopes = vec![];
        claim_scopes(
            &rules,
            "https://elsewhere",
            claims.as_object().unwrap(),
            &mut scopes,
        );
        assert_eq!(scopes, ["greeter", "reflection", "other"]);

        let mut scopes = vec![];
        let claims = json!({"sub": 42, "groups": "admins-not"});
        claim_scopes(
            &rules,
            "https://k8s",
            claims.as_object().unwrap(),
            &mut scopes,
        );
        assert!(scopes.is_empty());
    }

    #[test]
    fn scope_claims_as_string_or_array() {
        let mut scopes = vec![];
        listed_scopes(Some(&json!("greeter  reflection")), &mut scopes);
        listed_scopes(Some(&json!(["greeter", "x", 3])), &mut scopes);
        listed_scopes(Some(&json!(7)), &mut scopes);
        listed_scopes(None, &mut scopes);
        assert_eq!(scopes, ["greeter", "reflection", "x"]);
    }

    #[test]
    fn cert_rules_then_the_fallback() {
        let cert = ClientIdentity {
            subject: "CN=checkout".into(),
            sans: vec![
                "dns:checkout.shop.svc".into(),
                "uri:spiffe://cluster.local/ns/shop/sa/checkout".into(),
            ],
        };
        let by =
            |uri: Option<&str>, dns: Option<&str>, subject: Option<&str>, scope: &str| CertRule {
                uri: uri.map(Into::into),
                dns: dns.map(Into::into),
                subject: subject.map(Into::into),
                scopes: vec![scope.into()],
            };
        let fallback = ["fallback".to_owned()];
        let spiffe = by(
            Some("spiffe://cluster.local/ns/shop/*"),
            None,
            None,
            "greeter",
        );
        assert_eq!(
            *cert_scopes(std::slice::from_ref(&spiffe), &cert, &fallback),
            ["greeter"]
        );
        let dns = by(None, Some("*.shop.svc"), None, "dns");
        let subject = by(None, None, Some("CN=checkout"), "subject");
        assert_eq!(
            *cert_scopes(&[spiffe, dns, subject], &cert, &fallback),
            ["greeter", "dns", "subject"]
        );
        // A URI pattern never matches a DNS name, nor the subject.
        let other = by(Some("checkout.shop.svc"), None, None, "no");
        assert_eq!(*cert_scopes(&[other], &cert, &fallback), ["fallback"]);
        assert!(cert_scopes(&[], &cert, &[]).is_empty());

        assert_eq!(
            cert_identity(&cert),
            "spiffe://cluster.local/ns/shop/sa/checkout"
        );
        let plain = ClientIdentity {
            subject: "CN=client".into(),
            sans: vec!["dns:client".into()],
        };
        assert_eq!(cert_identity(&plain), "CN=client");
    }
}
