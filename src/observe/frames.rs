//! Counting gRPC messages in a body as it streams, for `grpc_server_msg_received_total` and
//! `grpc_server_msg_sent_total`.
//!
//! A gRPC body is a sequence of messages, each a 5-byte prefix (compressed flag, 4-byte big-endian
//! length) then that many bytes; HTTP/2 DATA frames cut it anywhere: one frame may hold several
//! messages, or a piece of one, or a piece of a prefix. The counter keeps a few bytes of state
//! across chunks and never copies or allocates.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;

/// Where the counter is in the stream of length-prefixed messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCounter {
    /// Prefix bytes seen of the current message (0..5); 0 also when inside a payload.
    prefix_seen: u8,
    /// Length accumulated from the prefix so far.
    length: u32,
    /// Payload bytes of the current message still to come.
    remaining: u64,
}

impl MessageCounter {
    /// Reads the next `chunk` of the body; returns how many messages it completed.
    pub fn feed(&mut self, mut chunk: &[u8]) -> u64 {
        let mut completed = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take =
                    usize::try_from(self.remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
                chunk = &chunk[take..];
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    completed += 1;
                }
                continue;
            }
            // Byte 0 of the prefix is the compressed flag; bytes 1..5 are the length.
            if self.prefix_seen > 0 {
                self.length = (self.length << 8) | u32::from(chunk[0]);
            }
            chunk = &chunk[1..];
            self.prefix_seen += 1;
            if self.prefix_seen == 5 {
                self.remaining = u64::from(self.length);
                if self.remaining == 0 {
                    completed += 1;
                }
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
        completed
    }

    /// Counts the messages a frame completes into `counter`.
    pub fn count<T: AsRef<[u8]>>(&mut self, frame: &Frame<T>, counter: &Counter) {
        if let Some(data) = frame.data_ref() {
            let completed = self.feed(data.as_ref());
            if completed > 0 {
                counter.inc_by(completed);
            }
        }
    }
}

pin_project! {
    /// A request body that counts the messages the server reads from it; with no counter
    /// (metrics off) it only passes frames through.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        messages: MessageCounter,
        counter: Option<Counter>,
    }
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, counter: Option<Counter>) -> Self {
        Self {
            inner,
            messages: MessageCounter::default(),
            counter,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(frame)), Some(counter)) = (&frame, &*this.counter) {
            this.messages.count(frame, counter);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len));
        bytes
    }

    #[test]
    fn several_messages_in_one_chunk() {
        let mut stream = message(3);
        stream.extend(message(0));
        stream.extend(message(300));
        assert_eq!(MessageCounter::default().feed(&stream), 3);
    }

    #[test]
    fn every_split_point_counts_the_same() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(1));
        stream.extend(message(70_000));
        for size in [1, 2, 3, 4, 5, 6, 7, 16, 4096, 16_384] {
            let mut counter = MessageCounter::default();
            let total: u64 = stream.chunks(size).map(|c| counter.feed(c)).sum();
            assert_eq!(total, 4, "chunks of {size}");
        }
    }

    #[test]
    fn a_message_counts_once_it_is_complete() {
        let whole = message(8);
        let mut counter = MessageCounter::default();
        assert_eq!(counter.feed(&whole[..7]), 0);
        assert_eq!(counter.feed(&whole[7..]), 1);
        assert_eq!(counter.feed(&[]), 0);
    }

    #[test]
    fn a_counted_body_counts_into_its_counter() {
        let counter = Counter::default();
        let mut messages = MessageCounter::default();
        let mut stream = message(2);
        stream.extend(message(2));
        messages.count(&Frame::data(Bytes::from(stream)), &counter);
        messages.count(&Frame::<Bytes>::trailers(Default::default()), &counter);
        assert_eq!(counter.get(), 2);
    }
}
