//! Fault injection for rehearsals (`[faults]`): calls failed with a chosen code and/or delayed on
//! purpose, so that a client's retry policy, a mesh's outlier detection or an SLO alert can be
//! seen to work before an incident needs them (podinfo's random errors and delays, for gRPC).
//!
//! Two triggers: a share of the calls to a method (`[faults.methods."PATTERN"]`), spread evenly
//! rather than drawn at random, and a call's own
//! `greeter-fault` metadata (`code=UNAVAILABLE`, `delay=200ms`, or both), honoured only for a
//! caller holding the `faults` scope: anyone else sending it is refused, so no client can make a
//! server look broken to its dashboards. Every injected fault is counted
//! (`greeter_faults_injected_total`) and marked on the access line (`fault`), so a rehearsal is
//! never mistaken for an incident.
//!
//! The innermost layer, just before the routes: a faulted call has passed auth, its quota and a
//! call slot like a real one, holds its slot while delayed, and its deadline still bounds the
//! delay. With `[faults]` off the layer is not stacked at all (`server.rs` stacks it as an
//! `Option`): calls pay one branch.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::{Either, ready};
use tonic::{
    Code, Status,
    codegen::http::{self, HeaderMap, header::HeaderName},
};
use tower::{Layer, Service};

use crate::{
    call::auth::Authenticator,
    config::{FaultsConfig, MethodFault, Problem, Section},
    methods::{self, MethodTable},
    ops::metrics::MethodCounters,
    transport::listener::PeerInfo,
};

/// The scope a caller needs for its `greeter-fault` metadata to be honoured.
pub const SCOPE: &str = "faults";

/// The metadata that asks for a fault on one call.
pub const HEADER: HeaderName = HeaderName::from_static("greeter-fault");

/// What `greeter_faults_injected_total{kind}` counts, in the order a fault lists its kinds: calls
/// answered with an injected code, calls held for an injected delay.
pub const KINDS: &[&str] = &["error", "delay"];

/// The longest delay a fault may ask for; the call's deadline cuts most delays shorter anyway.
const MAX_DELAY: Duration = Duration::from_secs(300);

/// gRPC status codes by their canonical names, indexed by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A code by its canonical name; `OK` is not a fault (a delay alone says "slow but fine").
fn parse_code(name: &str) -> Result<Code, String> {
    CODE_NAMES
        .iter()
        .position(|code| *code == name)
        .filter(|&number| number > 0)
        .map(|number| Code::from_i32(number as i32))
        .ok_or_else(|| {
            format!(
                "unknown gRPC code {name:?}: one of {}",
                CODE_NAMES[1..].join(", ")
            )
        })
}

/// One fault: a delay before the handler runs, then (or instead) a status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    code: Option<Code>,
    delay: Option<Duration>,
}

impl Fault {
    /// A fault as `[faults.methods]` or the `greeter-fault` metadata gives it: something to do,
    /// and a delay within [`MAX_DELAY`].
    fn new(code: Option<Code>, delay: Option<Duration>) -> Result<Self, String> {
        match (code, delay) {
            (None, None) => Err("give code = \"NAME\" and/or delay = \"DURATION\"".into()),
            (_, Some(delay)) if delay > MAX_DELAY => Err(format!(
                "delay {} is longer than {}",
                humantime::format_duration(delay),
                humantime::format_duration(MAX_DELAY)
            )),
            _ => Ok(Self { code, delay }),
        }
    }

    /// Parses `greeter-fault` metadata: `code=NAME` and/or `delay=DURATION`, comma-separated.
    fn parse(text: &str) -> Result<Self, String> {
        let (mut code, mut delay) = (None, None);
        for pair in text.split(',').map(str::trim) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key.trim() {
                "code" if code.is_none() => code = Some(parse_code(value.trim())?),
                "delay" if delay.is_none() => {
                    delay = Some(humantime::parse_duration(value.trim()).map_err(|e| {
                        format!("delay {:?}: {e} (e.g. delay=200ms)", value.trim())
                    })?);
                }
                "code" | "delay" => return Err(format!("{key} is given twice")),
                _ => {
                    return Err(format!(
                        "{pair:?} is not code=NAME or delay=DURATION (e.g. \
                         code=UNAVAILABLE,delay=200ms)"
                    ));
                }
            }
        }
        Self::new(code, delay)
    }

    /// How the access line shows it: `code=UNAVAILABLE`, `delay=200ms`, or both.
    fn describe(&self) -> String {
        let code = self
            .code
            .map(|c| format!("code={}", CODE_NAMES[c as usize]));
        let delay = self
            .delay
            .map(|d| format!("delay={}", humantime::format_duration(d)));
        [code, delay]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The indices in [`KINDS`] this fault counts under.
    fn kinds(&self) -> impl Iterator<Item = usize> {
        [self.code.is_some(), self.delay.is_some()]
            .into_iter()
            .enumerate()
            .filter_map(|(kind, on)| on.then_some(kind))
    }
}

/// The whole of a method's calls, in hundredths of a percent.
const ALL: u64 = 10_000;

/// A method's fault, for `percent` of its calls, spread evenly: each call adds its share to a
/// running sum and gets the fault when the sum passes a whole. Exactly that share in every
/// stretch of calls, never a streak longer than the share implies (none at 50% or less): a
/// rehearsal is repeatable, and a client retrying a call meets the share, not bad luck.
#[derive(Debug)]
struct MethodRule {
    /// The share, in hundredths of a percent.
    share: u64,
    calls: AtomicU64,
    fault: Fault,
}

impl MethodRule {
    /// Whether this call, the next of the method's, gets the fault.
    fn strikes(&self) -> bool {
        let before = self.calls.fetch_add(self.share, Ordering::Relaxed) % ALL;
        before + self.share >= ALL
    }
}

fn method_rule(fault: &MethodFault) -> Result<MethodRule, String> {
    if !(fault.percent >= 0.01 && fault.percent <= 100.0) {
        return Err(format!(
            "percent = {} must be between 0.01 and 100",
            fault.percent
        ));
    }
    let code = fault.code.as_deref().map(parse_code).transpose()?;
    Ok(MethodRule {
        share: (fault.percent * 100.0).round() as u64,
        calls: AtomicU64::new(0),
        fault: Fault::new(code, fault.delay)?,
    })
}

impl Section for FaultsConfig {
    /// Method faults only when fault injection is on (production says `enabled = false`, so a
    /// stray entry layered over it is refused, not ignored); patterns `MethodTable`
    /// understands; a percentage, a known code, a bounded delay.
    fn check(&self) -> Result<(), Problem> {
        if let Some(pattern) = self.methods.keys().next().filter(|_| !self.enabled) {
            return Err(Problem {
                key: "faults.methods",
                message: format!(
                    "faults.methods.\"{pattern}\" is set but fault injection is off: set \
                     faults.enabled = true in the same config to rehearse with it (never in \
                     production), or remove the entry"
                ),
            });
        }
        for (pattern, fault) in &self.methods {
            let problem = |message: String| Problem {
                key: "faults.methods",
                message: format!("faults.methods.\"{pattern}\": {message}"),
            };
            methods::check_pattern(pattern).map_err(|p| problem(p.into()))?;
            method_rule(fault).map_err(problem)?;
        }
        Ok(())
    }
}

/// The faults of a server with `[faults]` on.
#[derive(Debug)]
struct Faults {
    methods: MethodTable<MethodRule>,
    /// Who may ask for a fault with metadata; `None` (auth off): nobody.
    auth: Option<Authenticator>,
    injected: MethodCounters,
}

impl Faults {
    /// The fault for one call, `Ok(None)` for most; `Err` for metadata that cannot be honoured.
    fn choose(
        &self,
        path: &str,
        headers: &HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Option<Fault>, Status> {
        if let Some(value) = headers.get(HEADER) {
            // Verified again, only for calls that ask: most calls carry no such header.
            let granted = self
                .auth
                .as_ref()
                .is_some_and(|auth| auth.grants(SCOPE, path, headers, peer));
            if !granted {
                return Err(Status::permission_denied(format!(
                    "greeter-fault metadata needs a caller with scope {SCOPE:?} (auth on, and \
                     credentials granting it)"
                )));
            }
            let text = value.to_str().unwrap_or_default();
            return Fault::parse(text)
                .map(Some)
                .map_err(|e| Status::invalid_argument(format!("greeter-fault: {e}")));
        }
        Ok(self
            .methods
            .lookup(path)
            .filter(|rule| rule.strikes())
            .map(|rule| rule.fault.clone()))
    }
}

/// On an answer to a faulted call, for the access line: the fault, e.g. `code=UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault(pub Box<str>);

/// The tower layer, stacked only with `faults.enabled`. Logs a warning when made: injected
/// faults must never go unnoticed.
#[derive(Debug, Clone)]
pub struct FaultLayer(Arc<Faults>);

impl FaultLayer {
    /// `config` has passed its checks; `injected` counts by [`KINDS`].
    pub fn new(
        config: &FaultsConfig,
        auth: Option<Authenticator>,
        injected: MethodCounters,
    ) -> Self {
        let methods = config.methods.iter().map(|(pattern, fault)| {
            let rule = method_rule(fault).expect("faults.methods is checked at load");
            (pattern.clone(), rule)
        });
        tracing::warn!(
            methods = config.methods.len(),
            metadata = auth.is_some(),
            "fault injection is on ([faults]): calls fail or slow down on purpose"
        );
        Self(Arc::new(Faults {
            methods: MethodTable::new(methods),
            auth,
            injected,
        }))
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            faults: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    faults: Arc<Faults>,
}

type Faulted<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for FaultService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Faulted<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let peer = request.extensions().get::<PeerInfo>();
        let fault = match self.faults.choose(path, request.headers(), peer) {
            Ok(None) => return Either::Left(self.inner.call(request)),
            Ok(Some(fault)) => fault,
            Err(status) => return Either::Right(Box::pin(ready(Ok(status.into_http())))),
        };
        for kind in fault.kinds() {
            self.faults.injected.inc(path, kind);
        }
        let marker = InjectedFault(fault.describe().into());
        tracing::debug!(path, fault = &*marker.0, "fault injected");
        // The clone that was made ready is the one to call, after the delay.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Either::Right(Box::pin(async move {
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay).await;
            }
            let mut response = match fault.code {
                Some(code) => Status::new(code, format!("injected fault ([faults]): {}", marker.0))
                    .into_http(),
                None => inner.call(request).await?,
            };
            response.extensions_mut().insert(marker);
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(enabled: bool, entries: &[(&str, MethodFault)]) -> FaultsConfig {
        FaultsConfig {
            enabled,
            methods: entries
                .iter()
                .map(|(p, f)| ((*p).to_owned(), f.clone()))
                .collect(),
        }
    }

    fn fault(percent: f64, code: Option<&str>, delay: Option<u64>) -> MethodFault {
        MethodFault {
            percent,
            code: code.map(Into::into),
            delay: delay.map(Duration::from_millis),
        }
    }

    #[test]
    fn off_in_the_embedded_default() {
        let faults = Config::embedded().faults;
        assert!(!faults.enabled);
        assert!(faults.methods.is_empty());
    }

    #[test]
    fn method_faults_are_refused_while_off() {
        let entry = ("/a.S/M", fault(10.0, Some("UNAVAILABLE"), None));
        let problem = config(false, std::slice::from_ref(&entry))
            .check()
            .unwrap_err();
        assert_eq!(problem.key, "faults.methods");
        assert!(
            problem.message.contains("faults.enabled = true"),
            "{problem:?}"
        );
        config(true, &[entry]).check().unwrap();
    }

    #[test]
    fn bad_entries_name_what_is_wrong() {
        for (entry, wanted) in [
            (
                ("a.S/M", fault(10.0, Some("INTERNAL"), None)),
                "a pattern is",
            ),
            (
                ("/a.S/M", fault(0.0, Some("INTERNAL"), None)),
                "between 0.01",
            ),
            (("/a.S/M", fault(100.5, Some("INTERNAL"), None)), "and 100"),
            (("/a.S/M", fault(5.0, None, None)), "code = \"NAME\""),
            (("/a.S/M", fault(5.0, Some("OK"), None)), "one of CANCELLED"),
            (
                ("/a.S/M", fault(5.0, Some("unavailable"), None)),
                "UNAVAILABLE, DATA_LOSS",
            ),
            (
                ("/a.S/M", fault(5.0, None, Some(301_000))),
                "longer than 5m",
            ),
        ] {
            let problem = config(true, std::slice::from_ref(&entry))
                .check()
                .unwrap_err();
            assert!(problem.message.contains(wanted), "{entry:?}: {problem:?}");
            assert!(problem.message.contains(entry.0), "{problem:?}");
        }
    }

    #[test]
    fn metadata_parses_and_describes_itself() {
        let both = Fault::parse("code=UNAVAILABLE, delay=200ms").unwrap();
        assert_eq!(
            both,
            Fault {
                code: Some(Code::Unavailable),
                delay: Some(Duration::from_millis(200)),
            }
        );
        assert_eq!(both.describe(), "code=UNAVAILABLE,delay=200ms");
        assert_eq!(both.kinds().collect::<Vec<_>>(), [0, 1]);
        let slow = Fault::parse("delay=1s").unwrap();
        assert_eq!(slow.describe(), "delay=1s");
        assert_eq!(slow.kinds().collect::<Vec<_>>(), [1]);
        assert_eq!(
            Fault::parse("code=DATA_LOSS").unwrap().describe(),
            "code=DATA_LOSS"
        );
        for (bad, wanted) in [
            ("", "is not code=NAME"),
            ("code=NOPE", "unknown gRPC code \"NOPE\""),
            ("delay=soon", "delay \"soon\""),
            ("code=INTERNAL,code=UNKNOWN", "given twice"),
            ("colour=red", "is not code=NAME"),
            ("delay=10m", "longer than"),
        ] {
            let error = Fault::parse(bad).unwrap_err();
            assert!(error.contains(wanted), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_share_is_spread_evenly() {
        let rule = method_rule(&fault(30.0, Some("UNAVAILABLE"), None)).unwrap();
        let struck: Vec<bool> = (0..1000).map(|_| rule.strikes()).collect();
        assert_eq!(struck.iter().filter(|&&f| f).count(), 300);
        // Every stretch of ten calls has three faults, none of them next to another.
        for window in struck.chunks(10) {
            assert_eq!(window.iter().filter(|&&f| f).count(), 3, "{window:?}");
        }
        assert!(!struck.windows(2).any(|w| w[0] && w[1]));
        let rare = method_rule(&fault(0.5, None, Some(1))).unwrap();
        assert_eq!((0..1000).filter(|_| rare.strikes()).count(), 5);
    }

    #[test]
    fn a_share_of_the_calls_get_the_method_fault() {
        let injected = MethodCounters::register(
            &mut Default::default(),
            &crate::ops::metrics::faults_injected(KINDS),
            &[],
        );
        let faults = Faults {
            methods: MethodTable::new([
                (
                    "/a.S/Half".to_owned(),
                    method_rule(&fault(50.0, Some("INTERNAL"), None)).unwrap(),
                ),
                (
                    "/a.S/All".to_owned(),
                    method_rule(&fault(100.0, None, Some(5))).unwrap(),
                ),
            ]),
            auth: None,
            injected,
        };
        let chosen = |path: &str| -> Vec<bool> {
            (0..2000)
                .map(|_| {
                    faults
                        .choose(path, &HeaderMap::new(), None)
                        .unwrap()
                        .is_some()
                })
                .collect()
        };
        assert!(chosen("/a.S/All").iter().all(|&f| f));
        assert!(chosen("/a.S/Other").iter().all(|&f| !f));
        // Exactly half, and never two in a row.
        let half = chosen("/a.S/Half");
        assert_eq!(half.iter().filter(|&&f| f).count(), 1000);
        assert!(!half.windows(2).any(|w| w[0] && w[1]), "{half:?}");

        // Metadata without auth: nobody holds the scope.
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, "code=UNAVAILABLE".parse().unwrap());
        let refused = faults.choose("/a.S/Other", &headers, None).unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(
            refused.message().contains("scope \"faults\""),
            "{refused:?}"
        );
    }
}
