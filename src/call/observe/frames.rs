//! Counting gRPC messages in a body as it streams, for `grpc_server_msg_received_total` and
//! `grpc_server_msg_sent_total`.
//!
//! A gRPC body is a sequence of messages, each a 5-byte prefix (compressed flag, 4-byte big-endian
//! length) then that many bytes; HTTP/2 DATA frames cut it anywhere: one frame may hold several
//! messages, or a piece of one, or a piece of a prefix. The counter keeps a few bytes of state
//! across chunks and never copies or allocates.

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::counter::Counter;

use crate::call::body::{Watch, Watched};

/// Where the counter is in the stream of length-prefixed messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCounter {
    /// Prefix bytes seen of the current message (0..5); 0 also when inside a payload.
    prefix_seen: u8,
    /// Length accumulated from the prefix so far.
    length: u32,
    /// Length the current message's prefix announced, once complete.
    announced: u32,
    /// Payload bytes of the current message still to come.
    remaining: u64,
}

/// What one chunk did: messages it completed, and the largest length a prefix in it announced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    pub completed: u64,
    pub largest_announced: u32,
}

impl MessageCounter {
    /// Reads the next `chunk` of the body.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Fed {
        let mut fed = Fed::default();
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take =
                    usize::try_from(self.remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
                chunk = &chunk[take..];
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    fed.completed += 1;
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
                self.announced = self.length;
                fed.largest_announced = fed.largest_announced.max(self.length);
                self.remaining = u64::from(self.length);
                if self.remaining == 0 {
                    fed.completed += 1;
                }
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
        fed
    }

    /// Bytes of the message in progress received so far, prefix included: what a decoder holds
    /// until the message is complete.
    pub fn partial_bytes(&self) -> u64 {
        if self.remaining > 0 {
            5 + u64::from(self.announced) - self.remaining
        } else {
            u64::from(self.prefix_seen)
        }
    }

    /// Counts the messages a frame completes into `counter`.
    pub fn count<T: AsRef<[u8]>>(&mut self, frame: &Frame<T>, counter: &Counter) {
        if let Some(data) = frame.data_ref() {
            let completed = self.feed(data.as_ref()).completed;
            if completed > 0 {
                counter.inc_by(completed);
            }
        }
    }
}

/// A request body that counts the messages the server reads from it; with no counter (metrics
/// off) it only passes frames through.
pub type CountedBody<B> = Watched<B, Counting>;

/// Counts complete messages into `counter` (the method's metric) and `tally` (the call's span),
/// when there are any.
#[derive(Debug, Default)]
pub struct Counting {
    messages: MessageCounter,
    counter: Option<Counter>,
    tally: Option<Counter>,
}

impl Counting {
    pub fn new(counter: Option<Counter>, tally: Option<Counter>) -> Self {
        Self {
            messages: MessageCounter::default(),
            counter,
            tally,
        }
    }
}

impl Watch for Counting {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        match (&self.counter, &self.tally) {
            (None, None) => {}
            (Some(counter), None) | (None, Some(counter)) => self.messages.count(frame, counter),
            (Some(counter), Some(tally)) => {
                if let Some(data) = frame.data_ref() {
                    let completed = self.messages.feed(data).completed;
                    if completed > 0 {
                        counter.inc_by(completed);
                        tally.inc_by(completed);
                    }
                }
            }
        }
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
        let fed = MessageCounter::default().feed(&stream);
        assert_eq!(
            fed,
            Fed {
                completed: 3,
                largest_announced: 300
            }
        );
    }

    #[test]
    fn every_split_point_counts_the_same() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(1));
        stream.extend(message(70_000));
        for size in [1, 2, 3, 4, 5, 6, 7, 16, 4096, 16_384] {
            let mut counter = MessageCounter::default();
            let total: u64 = stream.chunks(size).map(|c| counter.feed(c).completed).sum();
            assert_eq!(total, 4, "chunks of {size}");
        }
    }

    #[test]
    fn a_message_counts_once_it_is_complete() {
        let whole = message(8);
        let mut counter = MessageCounter::default();
        assert_eq!(counter.feed(&whole[..3]).completed, 0);
        assert_eq!(counter.partial_bytes(), 3);
        assert_eq!(counter.feed(&whole[3..7]).completed, 0);
        assert_eq!(counter.partial_bytes(), 7);
        assert_eq!(counter.feed(&whole[7..]).completed, 1);
        assert_eq!(counter.partial_bytes(), 0);
        assert_eq!(counter.feed(&[]).completed, 0);
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

    #[test]
    fn with_metrics_and_a_trace_both_count() {
        let (counter, tally) = (Counter::default(), Counter::default());
        let mut counting = Counting::new(Some(counter.clone()), Some(tally.clone()));
        let mut stream = message(2);
        stream.extend(message(0));
        counting.frame(&Frame::data(Bytes::from(stream)));
        counting.frame(&Frame::data(Bytes::from(message(1))));
        assert_eq!((counter.get(), tally.get()), (3, 3));
    }
}
