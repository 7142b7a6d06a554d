//! OpenTelemetry traces, the operator's side: the pipeline that takes ended spans to a collector
//! (sampler, resource, bounded batch queue, OTLP exporter) and stops it at shutdown within a
//! bound. The spans themselves are started and ended per call by `call::observe`.
//!
//! Built only with `tracing.enabled = true`; otherwise there is no provider, no task and no queue,
//! and the call path holds no tracer.

mod export;
mod queue;

use std::{sync::Arc, time::Duration};

use opentelemetry::KeyValue;
use opentelemetry_sdk::{
    Resource, runtime,
    trace::{
        BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider,
        span_processor_with_async_runtime::BatchSpanProcessor,
    },
};

pub use export::ExportMaterial;
pub use queue::SpanQueue;

use crate::config::{Problem, Section, TracingConfig};

/// The `service.name` of every span.
const SERVICE_NAME: &str = "greeter";

/// Room in the SDK's own queue beyond `max_queue_size`, for its flush and shutdown messages: the
/// gate (queue.rs) never lets spans fill it.
const CONTROL_MESSAGES: usize = 16;

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{key} ({path}): {message}")]
    File {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("cannot build the OTLP exporter (tracing.endpoint): {0}")]
    Exporter(String),
}

impl Section for TracingConfig {
    /// The endpoint is a URI the chosen transport can reach, the ratio a probability, the queue
    /// and batch usable, and TLS files are asked for only where TLS is spoken.
    fn check(&self) -> Result<(), Problem> {
        if !self.enabled {
            return Ok(());
        }
        let problem = |key, message: &str| {
            Err(Problem {
                key,
                message: message.into(),
            })
        };
        let uri = self.endpoint.parse::<http::Uri>().ok();
        let scheme = uri.as_ref().and_then(|uri| uri.scheme_str());
        if !matches!(scheme, Some("http" | "https"))
            || uri.as_ref().and_then(http::Uri::host).is_none()
        {
            return problem(
                "tracing.endpoint",
                "must be an http:// or https:// URL with a host, e.g. \
                 \"http://otel-collector:4317\"",
            );
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return problem("tracing.sample_ratio", "must be between 0.0 and 1.0");
        }
        if self.max_queue_size == 0 {
            return problem("tracing.max_queue_size", "must be at least 1");
        }
        if !(1..=self.max_queue_size).contains(&self.max_export_batch_size) {
            return problem(
                "tracing.max_export_batch_size",
                "must be between 1 and tracing.max_queue_size",
            );
        }
        for (key, duration) in [
            ("tracing.scheduled_delay", self.scheduled_delay),
            ("tracing.export_timeout", self.export_timeout),
        ] {
            if duration.is_zero() {
                return problem(key, "must be above zero (e.g. \"5s\")");
            }
        }
        let tls_files = [
            ("tracing.ca_file", &self.ca_file),
            ("tracing.cert_file", &self.cert_file),
            ("tracing.key_file", &self.key_file),
        ];
        if scheme == Some("http")
            && let Some((key, _)) = tls_files.iter().find(|(_, p)| !p.as_os_str().is_empty())
        {
            return problem(key, "needs an https:// tracing.endpoint");
        }
        if self.cert_file.as_os_str().is_empty() != self.key_file.as_os_str().is_empty() {
            return problem(
                "tracing.cert_file",
                "tracing.cert_file and tracing.key_file go together: set both or neither",
            );
        }
        Ok(())
    }
}

/// The running trace pipeline.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    queue: Arc<SpanQueue>,
    flush_bound: Duration,
}

impl Telemetry {
    /// Starts the pipeline; call within the Tokio runtime, whose task sends the batches.
    pub fn start(
        config: &TracingConfig,
        material: &ExportMaterial,
    ) -> Result<Self, TelemetryError> {
        let queue = Arc::new(SpanQueue::new(config.max_queue_size));
        let exporter = queue::Counted {
            inner: material.exporter(config)?,
            queue: Arc::clone(&queue),
        };
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size + CONTROL_MESSAGES)
            .with_max_export_batch_size(config.max_export_batch_size)
            .with_scheduled_delay(config.scheduled_delay)
            .with_max_export_timeout(config.export_timeout)
            .build();
        let processor = queue::Gate {
            inner: BatchSpanProcessor::builder(exporter, runtime::Tokio)
                .with_batch_config(batches)
                .build(),
            queue: Arc::clone(&queue),
        };
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", instance_id(config)),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer_with_scope(
            &provider,
            opentelemetry::InstrumentationScope::builder(SERVICE_NAME)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Self {
            provider,
            tracer,
            queue,
            flush_bound: config.export_timeout,
        })
    }

    /// The tracer the per-call layer starts spans with.
    pub fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// The queue's drop counts, for the metrics.
    pub fn queue(&self) -> Arc<SpanQueue> {
        Arc::clone(&self.queue)
    }

    /// Exports what is still queued, waiting at most `tracing.export_timeout`: a collector that
    /// is down loses the last spans but does not hold up the exit.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The SDK's shutdown blocks its thread until the export task answers.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(self.flush_bound, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "flushing spans at shutdown failed"),
            Ok(Err(error)) => tracing::warn!(%error, "flushing spans at shutdown failed"),
            Err(_) => tracing::warn!(
                bound = ?self.flush_bound,
                "flushing spans at shutdown took longer than tracing.export_timeout; gave up"
            ),
        }
    }
}

/// `tracing.service_instance_id`, else `HOSTNAME` (a pod's name in Kubernetes), else the kernel's
/// host name.
fn instance_id(config: &TracingConfig) -> String {
    if !config.service_instance_id.is_empty() {
        return config.service_instance_id.clone();
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
