//! The catalog of every method served, read from the same descriptor sets reflection serves, so
//! that layers can tell a unary call from a stream without hard-coding method names.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::FileDescriptorSet;

mod bound;

pub use bound::largest_requests;

/// The four gRPC call shapes, named as go-grpc-prometheus labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodKind {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl MethodKind {
    /// Whether the server sends a stream: such calls are ended by the server at shutdown.
    pub fn server_streams(self) -> bool {
        matches!(self, Self::ServerStream | Self::BidiStream)
    }

    /// Whether the client sends a stream of requests.
    pub fn client_streams(self) -> bool {
        matches!(self, Self::ClientStream | Self::BidiStream)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ClientStream => "client_stream",
            Self::ServerStream => "server_stream",
            Self::BidiStream => "bidi_stream",
        }
    }
}

/// One method of a served service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// Fully qualified service name, `package.Service`.
    pub service: String,
    pub method: String,
    pub kind: MethodKind,
}

impl Method {
    /// The HTTP/2 path of its calls: `/package.Service/Method`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }
}

/// What the server serves, and describes by reflection: every proto under `proto/` (helloworld),
/// health, both reflection protocols (grpcurl before 1.9 and many tools speak only v1alpha), and
/// google.rpc's Status and BadRequest, so clients can decode error details by reflection. A server
/// serving services of its own adds theirs ([`descriptor_sets`]).
pub const DESCRIPTOR_SETS: [&[u8]; 5] = [
    crate::pb::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    tonic_types::pb::FILE_DESCRIPTOR_SET,
];

/// The one list every layer reads (metrics, tables, Connect, reflection, the config's checks):
/// [`DESCRIPTOR_SETS`] and those of the services `added` beside them, each once. A service whose
/// proto is under `proto/` is described by `pb::FILE_DESCRIPTOR_SET` already, and is added with it
/// all the same: registered twice, reflection and the metrics would list its methods twice.
pub fn descriptor_sets(added: &[&'static [u8]]) -> Vec<&'static [u8]> {
    let mut sets = DESCRIPTOR_SETS.to_vec();
    for set in added {
        if !sets.contains(set) {
            sets.push(set);
        }
    }
    sets
}

/// Every method of every service in encoded `FileDescriptorSet`s.
///
/// # Panics
/// If a set does not decode: they are compiled in, so that is a build defect.
pub fn served_methods(sets: &[&[u8]]) -> Vec<Method> {
    let mut methods = Vec::new();
    for encoded in sets {
        let set = FileDescriptorSet::decode(*encoded).expect("embedded descriptor set decodes");
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => MethodKind::Unary,
                        (true, false) => MethodKind::ClientStream,
                        (false, true) => MethodKind::ServerStream,
                        (true, true) => MethodKind::BidiStream,
                    };
                    methods.push(Method {
                        service: service_name.clone(),
                        method: method.name().to_owned(),
                        kind,
                    });
                }
            }
        }
    }
    methods
}

/// What a method requires of its caller (`auth.policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Open,
    Scope(String),
}

/// Whether `pattern` is one [`MethodTable`] understands: `*`, `/package.Service/*` or
/// `/package.Service/Method`. A pattern of another shape would silently never match.
pub fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    let well_formed = pattern == "*"
        || pattern.strip_prefix('/').is_some_and(|rest| {
            rest.split_once('/').is_some_and(|(service, method)| {
                !service.is_empty() && !method.is_empty() && !method.contains('/')
            })
        });
    if well_formed {
        Ok(())
    } else {
        Err("a pattern is \"*\", \"/package.Service/*\" or \"/package.Service/Method\"")
    }
}

/// `None` when a well-formed `pattern` names something `served` has; else what is wrong, with the
/// closest served method (or service) when one is near: a mistyped pattern would silently apply
/// to nothing.
pub fn unmatched(pattern: &str, served: &[Method]) -> Option<String> {
    let (service, method) = pattern
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))?;
    let (what, candidates): (_, Vec<String>) = if method == "*" {
        if served.iter().any(|m| m.service == service) {
            return None;
        }
        (
            "service",
            served.iter().map(|m| format!("/{}/*", m.service)).collect(),
        )
    } else {
        if served
            .iter()
            .any(|m| m.service == service && m.method == method)
        {
            return None;
        }
        ("method", served.iter().map(Method::path).collect())
    };
    let closest = candidates
        .iter()
        .min_by_key(|candidate| strsim::levenshtein(pattern, candidate))
        .filter(|candidate| strsim::levenshtein(pattern, candidate) <= pattern.len() / 3);
    Some(match closest {
        Some(closest) => format!("names no served {what}; did you mean {closest:?}?"),
        None => format!(
            "names no served {what} (greeter serves {})",
            served_services(served).join(", ")
        ),
    })
}

fn served_services(served: &[Method]) -> Vec<&str> {
    let mut services: Vec<&str> = served.iter().map(|m| m.service.as_str()).collect();
    services.dedup();
    services
}

/// Per-method settings keyed by pattern: `/pkg.Service/Method`, `/pkg.Service/*` or `*`. Looking
/// up a call's path finds the most specific entry without allocating (it runs on every call).
#[derive(Debug, Clone)]
pub struct MethodTable<T> {
    methods: BTreeMap<String, T>,
    /// `/pkg.Service/*` entries, keyed by `/pkg.Service`.
    services: BTreeMap<String, T>,
    any: Option<T>,
}

impl<T> MethodTable<T> {
    pub fn new(entries: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut table = Self {
            methods: BTreeMap::new(),
            services: BTreeMap::new(),
            any: None,
        };
        for (pattern, value) in entries {
            if pattern == "*" {
                table.any = Some(value);
            } else if let Some(service) = pattern.strip_suffix("/*") {
                table.services.insert(service.to_owned(), value);
            } else {
                table.methods.insert(pattern, value);
            }
        }
        table
    }

    /// The entry for the method itself, else for its service: `*` is not consulted.
    pub fn specific(&self, path: &str) -> Option<&T> {
        self.methods.get(path).or_else(|| {
            path.rfind('/')
                .filter(|&i| i > 0)
                .and_then(|i| self.services.get(&path[..i]))
        })
    }

    /// The `/pkg.Service/Method` patterns.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    /// The services of the `/pkg.Service/*` patterns, as `/pkg.Service`.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The most specific entry: the method, its service, then `*`.
    pub fn lookup(&self, path: &str) -> Option<&T> {
        self.specific(path).or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_checked() {
        for good in ["*", "/a.S/*", "/a.S/M"] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        for bad in ["", "a.S/M", "/a.S", "//M", "/a.S/", "/a.S/M/x", "/a.S/M*x/"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn method_table_prefers_the_most_specific_pattern() {
        let table = MethodTable::new([
            ("*".to_owned(), 1),
            ("/a.S/*".to_owned(), 2),
            ("/a.S/M".to_owned(), 3),
        ]);
        assert_eq!(table.lookup("/a.S/M"), Some(&3));
        assert_eq!(table.lookup("/a.S/N"), Some(&2));
        assert_eq!(table.lookup("/b.T/M"), Some(&1));
        assert_eq!(table.specific("/b.T/M"), None);
        assert_eq!(MethodTable::<u8>::new([]).lookup("/a.S/M"), None);
    }

    #[test]
    fn each_descriptor_set_is_read_once() {
        let own: &[u8] = b"another set";
        let sets = descriptor_sets(&[crate::pb::FILE_DESCRIPTOR_SET, own, own]);
        assert_eq!(sets.len(), DESCRIPTOR_SETS.len() + 1);
        assert_eq!(sets.last(), Some(&own));
    }

    #[test]
    fn patterns_that_name_nothing_served_say_what_is_closest() {
        let served = served_methods(&DESCRIPTOR_SETS);
        for pattern in [
            "*",
            "/helloworld.Greeter/SayHello",
            "/helloworld.Greeter/*",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert_eq!(unmatched(pattern, &served), None, "{pattern}");
        }
        assert_eq!(
            unmatched("/helloworld.Greeter/SayHelo", &served).as_deref(),
            Some("names no served method; did you mean \"/helloworld.Greeter/SayHello\"?")
        );
        assert_eq!(
            unmatched("/helloworld.Greter/*", &served).as_deref(),
            Some("names no served service; did you mean \"/helloworld.Greeter/*\"?")
        );
        let far = unmatched("/billing.Invoices/Create", &served).unwrap();
        assert!(
            far.starts_with("names no served method (greeter serves helloworld.Greeter, "),
            "{far}"
        );
    }
}
