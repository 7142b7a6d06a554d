//! A body passed through unchanged while something watches its frames or rides along until it is
//! dropped: the delegation (`poll_frame`, `is_end_stream`, `size_hint`) layers would otherwise each
//! repeat. And the draining of a body answered unread.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use pin_project_lite::pin_project;

/// What rides along with a [`Watched`] body: it sees every frame, and is dropped with the body.
pub trait Watch {
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
}

pin_project! {
    /// `inner`, frame for frame, with `watch` looking on.
    pub struct Watched<B, W> {
        #[pin]
        inner: B,
        watch: W,
    }
}

impl<B, W> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Self {
        Self { inner, watch }
    }
}

/// An empty body with a default watcher: what a layer outside answers refusals with.
impl<B: Default, W: Default> Default for Watched<B, W> {
    fn default() -> Self {
        Self::new(B::default(), W::default())
    }
}

impl<B: Body<Data = Bytes>, W: Watch> Body for Watched<B, W> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            this.watch.frame(frame);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long a request body answered unread may take to arrive, to be thrown away.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads `body` to its end and drops what it reads, up to `max` bytes and [`DRAIN_TIMEOUT`]: a
/// request answered before its body was read (a refusal) then ends cleanly for a client still
/// sending it (see `connect::request::Unread::discard` for why, over each HTTP version).
pub async fn drain<B: Body<Data = Bytes>>(body: B, max: usize) {
    let mut body = std::pin::pin!(body);
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen = seen.saturating_add(frame.data_ref().map_or(0, Bytes::len));
            if seen > max {
                break;
            }
        }
    })
    .await;
}
