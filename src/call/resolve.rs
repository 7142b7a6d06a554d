//! One method resolution per call. The outermost per-call layer ([`super::observe`]) looks the
//! call's path up once and puts its [`Resolved`] entry in the request's extensions; every layer
//! further in reads what it needs from there instead of hashing or comparing the path again.
//!
//! The entries are computed at startup from the served methods and every per-method table
//! (`auth.policy`, `deadline.methods`, the message limits, the replies sent plain), so a call costs one hash lookup and
//! one `Arc` clone. A path no service has resolves like before: to the entry of the method or the
//! service a table names, else to one shared "unknown" entry.

use std::{collections::HashMap, sync::Arc};

use tonic::codegen::http;

use crate::{
    call::deadline::DeadlinePolicy,
    config::DeadlineLimits,
    methods::{Method, MethodKind, MethodTable, Rule},
    ops::metrics::{GrpcMetrics, MethodMetrics},
};

type Table = HashMap<Box<str>, Arc<Resolved>, foldhash::fast::RandomState>;

/// Everything the per-call layers need to know about one method.
#[derive(Debug)]
pub struct Resolved {
    /// `None` for a path no service has.
    pub kind: Option<MethodKind>,
    /// Its go-grpc-prometheus series (the shared `unknown` ones for a path no service has).
    pub metrics: Arc<MethodMetrics>,
    /// Its deadline default and cap.
    pub deadline: DeadlineLimits,
    /// What `auth.policy` requires of its callers; `None`: no pattern covers it.
    pub rule: Option<Rule>,
    /// The largest request message it accepts.
    pub max_request_bytes: usize,
    /// Its replies go uncompressed whatever the client accepts (see `service::compression`).
    pub plain_replies: bool,
}

impl Resolved {
    /// The entry the outermost layer put in the request.
    ///
    /// # Panics
    /// If the request did not pass [`super::observe`], which resolves every call: the stack is
    /// assembled in one place (`server.rs`), so that is a wiring defect.
    pub fn of<B>(request: &http::Request<B>) -> &Arc<Self> {
        request
            .extensions()
            .get::<Arc<Self>>()
            .expect("the observe layer resolves every call's method")
    }
}

/// The per-method tables entries are computed from.
pub struct Tables<'a> {
    pub metrics: &'a GrpcMetrics,
    pub deadlines: &'a DeadlinePolicy,
    /// `None` with auth off: no layer asks.
    pub policy: Option<&'a MethodTable<Rule>>,
    pub message_limits: &'a MethodTable<usize>,
    pub plain_replies: &'a [String],
}

impl Tables<'_> {
    fn entry(&self, path: &str, kind: Option<MethodKind>) -> Arc<Resolved> {
        Arc::new(Resolved {
            kind,
            metrics: Arc::clone(self.metrics.method(path)),
            deadline: self.deadlines.limits(path).clone(),
            rule: self.policy.and_then(|policy| policy.lookup(path)).cloned(),
            max_request_bytes: self.message_limits.lookup(path).copied().unwrap_or(0),
            plain_replies: self.plain_replies.iter().any(|plain| plain == path),
        })
    }
}

/// Path -> entry, for every served method; built once per server.
///
/// Hashed with foldhash rather than SipHash: a third of the lookup's cost. A client chooses the
/// path it looks up but cannot add keys, so collision flooding (what SipHash defends) has no
/// table to grow.
#[derive(Debug)]
pub struct Resolver {
    methods: Table,
    /// Entries of `/package.Service` a table names, for the paths of that service no method has.
    services: Table,
    unknown: Arc<Resolved>,
}

impl Resolver {
    pub fn new(served: &[Method], tables: &Tables<'_>) -> Self {
        let methods = served
            .iter()
            .map(|method| {
                let path = method.path();
                let entry = tables.entry(&path, Some(method.kind));
                (path.into_boxed_str(), entry)
            })
            .collect();
        let mut resolver = Self {
            methods,
            services: Table::default(),
            unknown: tables.entry("", None),
        };
        resolver.name(tables.deadlines.overrides(), tables);
        resolver.name(tables.message_limits, tables);
        if let Some(policy) = tables.policy {
            resolver.name(policy, tables);
        }
        resolver
    }

    /// Entries for the methods and services `table` names that no served method covers, so
    /// that a path of theirs resolves as the tables would have looked it up.
    fn name<T>(&mut self, table: &MethodTable<T>, tables: &Tables<'_>) {
        for path in table.methods() {
            self.methods
                .entry(path.into())
                .or_insert_with(|| tables.entry(path, None));
        }
        for service in table.services() {
            self.services
                .entry(service.into())
                .or_insert_with(|| tables.entry(&format!("{service}/"), None));
        }
    }

    /// The entry for a call's path: no allocation, one hash lookup for a served method.
    pub fn resolve(&self, path: &str) -> &Arc<Resolved> {
        self.methods.get(path).unwrap_or_else(|| {
            path.rfind('/')
                .filter(|&i| i > 0)
                .and_then(|i| self.services.get(&path[..i]))
                .unwrap_or(&self.unknown)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{config::Config, methods::served_methods};

    const SETS: [&[u8]; 2] = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];

    fn resolver(policy: &MethodTable<Rule>) -> Resolver {
        let metrics = GrpcMetrics::register(&mut Registry::default(), &SETS);
        let mut deadline = Config::embedded().deadline;
        deadline.methods.insert(
            "/helloworld.Greeter/Gone".to_owned(),
            DeadlineLimits {
                default: Duration::from_secs(1),
                max: Duration::from_secs(2),
            },
        );
        let message_limits = MethodTable::new([
            ("*".to_owned(), 10),
            ("/helloworld.Greeter/*".to_owned(), 20),
        ]);
        Resolver::new(
            &served_methods(&SETS),
            &Tables {
                metrics: &metrics,
                deadlines: &DeadlinePolicy::new(&deadline),
                policy: Some(policy),
                message_limits: &message_limits,
                plain_replies: &["/helloworld.Greeter/SayHelloStreamReply".to_owned()],
            },
        )
    }

    #[test]
    fn greeter_methods_have_their_kinds() {
        let resolver = resolver(&MethodTable::new([]));
        let kind = |m: &str| resolver.resolve(&format!("/helloworld.Greeter/{m}")).kind;
        assert_eq!(kind("SayHello"), Some(MethodKind::Unary));
        assert_eq!(kind("SayHelloAgain"), Some(MethodKind::Unary));
        assert_eq!(kind("SayHelloStreamReply"), Some(MethodKind::ServerStream));
        assert_eq!(kind("SayHelloBidiStream"), Some(MethodKind::BidiStream));
        assert_eq!(
            resolver.resolve("/grpc.health.v1.Health/Watch").kind,
            Some(MethodKind::ServerStream)
        );
        assert_eq!(resolver.resolve("/nope.Nope/Nope").kind, None);
    }

    #[test]
    fn unknown_paths_resolve_as_the_tables_name_them() {
        let resolver = resolver(&MethodTable::new([
            ("/helloworld.Greeter/*".to_owned(), Rule::Open),
            ("/other.Service/*".to_owned(), Rule::Scope("other".into())),
        ]));
        let hello = resolver.resolve("/helloworld.Greeter/SayHello");
        assert_eq!(hello.rule, Some(Rule::Open));
        assert_eq!(hello.max_request_bytes, 20);
        assert!(!hello.metrics.is_unknown());
        assert!(!hello.plain_replies);
        assert!(
            resolver
                .resolve("/helloworld.Greeter/SayHelloStreamReply")
                .plain_replies
        );

        // A method the Greeter does not have still falls under the Greeter's patterns.
        let missing = resolver.resolve("/helloworld.Greeter/Missing");
        assert_eq!(missing.kind, None);
        assert!(missing.metrics.is_unknown());
        assert_eq!(missing.rule, Some(Rule::Open));
        assert_eq!(missing.max_request_bytes, 20);
        let gone = resolver.resolve("/helloworld.Greeter/Gone");
        assert_eq!(gone.deadline.max, Duration::from_secs(2));
        let other = resolver.resolve("/other.Service/Call");
        assert_eq!(other.rule, Some(Rule::Scope("other".into())));

        let unknown = resolver.resolve("/nope.Nope/Nope");
        assert_eq!(unknown.rule, None);
        assert_eq!(unknown.max_request_bytes, 10);
        assert!(Arc::ptr_eq(unknown, resolver.resolve("/x")));
    }
}
