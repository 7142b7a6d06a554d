//! Services of your own, served beside the Greeter through every layer: the extension point of
//! ARCHITECTURE.md's "Adding your own service".

use std::{convert::Infallible, fmt, sync::Arc};

use tonic::{body::Body, server::NamedService, service::Routes};
use tower::Service;

/// A gRPC service added to a server ([`super::Server::bind_with`]): the generated server of a
/// proto, wrapping an implementation, and the descriptor set that proto compiles to. Its
/// descriptor joins [`crate::methods::DESCRIPTOR_SETS`] in the one list every layer reads, so the
/// service gets what the built-in ones get without naming it anywhere else: auth policy, message
/// limits, deadlines, quotas, metrics, traces, access lines, Connect JSON, reflection and health.
#[derive(Clone)]
pub struct OwnService {
    name: &'static str,
    descriptor_set: &'static [u8],
    max_request_bytes: Option<usize>,
    route: Arc<dyn Fn(Routes) -> Routes + Send + Sync>,
}

impl OwnService {
    /// `service`: a tonic-generated server, e.g. `TallyServer::new(Tally::default())`;
    /// `descriptor_set`: the encoded `FileDescriptorSet` describing it (and what it imports):
    /// [`crate::pb::FILE_DESCRIPTOR_SET`] for a proto under `proto/`.
    pub fn new<S>(service: S, descriptor_set: &'static [u8]) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self {
            name: S::NAME,
            descriptor_set,
            max_request_bytes: None,
            route: Arc::new(move |routes: Routes| routes.add_service(service.clone())),
        }
    }

    /// The largest request message its methods accept, for request types that do not bound it
    /// themselves (a string, bytes, a repeated field). Without it, such a method accepts up to
    /// `limits.max_recv_message_bytes`; a method whose request type has a largest encoding gets
    /// that (and room for fields a newer client adds) whatever is declared here.
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = Some(bytes);
        self
    }

    /// Its fully qualified name, `package.Service`: its routes' prefix, and its name in health.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The encoded `FileDescriptorSet` describing it, for [`crate::config::Config::load_serving`].
    pub fn descriptor_set(&self) -> &'static [u8] {
        self.descriptor_set
    }

    /// Its name and the largest request it declares, if it declares one.
    pub(super) fn declared(&self) -> Option<(&'static str, usize)> {
        Some((self.name, self.max_request_bytes?))
    }

    pub(super) fn add_to(&self, routes: Routes) -> Routes {
        (self.route)(routes)
    }
}

impl fmt::Debug for OwnService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnService")
            .field("name", &self.name)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish_non_exhaustive()
    }
}
