//! The bound on spans waiting for export, and the count of those dropped.
//!
//! The SDK's batch processor drops spans when its queue is full but only logs that it did (once,
//! and the total at shutdown): it has no counter to read. So the processor is wrapped: [`Gate`]
//! admits an ended span only while fewer than `max_queue_size` are held, and [`Counted`], around
//! the exporter, releases them once their export is over, however it ended. The inner queue is
//! sized above the gate's bound, so it never drops anything itself and every loss is counted here.

use std::{
    sync::Arc,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};

/// Spans held between their end and the end of their export, and the spans lost.
#[derive(Debug)]
pub struct SpanQueue {
    held: AtomicUsize,
    capacity: usize,
    dropped_full: AtomicU64,
    dropped_failed: AtomicU64,
    /// The last export failed: logged once, when it starts and when it ends.
    failing: AtomicBool,
}

impl SpanQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            capacity,
            dropped_full: AtomicU64::new(0),
            dropped_failed: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// Spans dropped because `max_queue_size` were already waiting.
    pub fn dropped_queue_full(&self) -> u64 {
        self.dropped_full.load(Ordering::Relaxed)
    }

    /// Spans lost because their export failed or timed out (the collector down, or refusing).
    pub fn dropped_export_failed(&self) -> u64 {
        self.dropped_failed.load(Ordering::Relaxed)
    }

    fn try_hold(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |held| {
                (held < self.capacity).then_some(held + 1)
            })
            .is_ok()
    }

    /// Ends the hold on an export's spans; `failure` says why they were not exported.
    fn release(&self, spans: usize, failure: Option<&str>) {
        self.held.fetch_sub(spans, Ordering::AcqRel);
        match failure {
            None => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export works again");
                }
            }
            Some(error) => {
                self.dropped_failed
                    .fetch_add(spans as u64, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error,
                        "span export failed; spans are dropped \
                         (greeter_trace_spans_dropped_total) until the collector answers"
                    );
                }
            }
        }
    }
}

/// The span processor, admitting ended spans only while the queue has room.
#[derive(Debug)]
pub struct Gate<P> {
    pub inner: P,
    pub queue: Arc<SpanQueue>,
}

impl<P: SpanProcessor> SpanProcessor for Gate<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queue.try_hold() {
            self.inner.on_end(span);
        } else {
            self.queue.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, releasing each batch's spans from the queue once its export is over.
#[derive(Debug)]
pub struct Counted<E> {
    pub inner: E,
    pub queue: Arc<SpanQueue>,
}

/// Releases a batch when dropped: the batch processor drops an export that outlives
/// `tracing.export_timeout`.
struct Release<'a> {
    queue: &'a SpanQueue,
    spans: usize,
    /// `None` once exported.
    failure: Option<String>,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.queue.release(self.spans, self.failure.as_deref());
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut release = Release {
            queue: &self.queue,
            spans: batch.len(),
            failure: Some("no answer within tracing.export_timeout".into()),
        };
        let result = self.inner.export(batch).await;
        release.failure = result.as_ref().err().map(ToString::to_string);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_holds_at_most_its_capacity_and_counts_failed_exports() {
        let queue = SpanQueue::new(2);
        assert!(queue.try_hold() && queue.try_hold());
        assert!(!queue.try_hold());
        queue.release(1, Some("refused"));
        assert_eq!(queue.dropped_export_failed(), 1);
        assert!(queue.try_hold());
        queue.release(2, None);
        assert_eq!(queue.dropped_export_failed(), 1);
        assert!(queue.try_hold());
    }
}
