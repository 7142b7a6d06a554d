//! The server's log writer: a line is appended to a shared buffer, and a thread writes the buffer
//! out in one `write(2)` once it has gathered for [`FLUSH_INTERVAL`] or holds [`HIGH_WATER`]
//! bytes.
//!
//! Why not tracing-appender's non-blocking writer, which this replaced: it copies each line into
//! a fresh allocation, sends it through a channel, and wakes its thread for every line that finds
//! it waiting. On a pod with one core (`cpu: 1`) that thread takes turns with the runtime, and at
//! a line per call those wake-ups cost more than the formatting. Here a line costs a lock and a
//! copy; the thread wakes at most once per batch (when a line lands in an empty buffer, or the
//! buffer passes the high-water mark), and never while the server is idle.
//!
//! Bounded: past [`MAX_QUEUED_BYTES`] a line is dropped and counted rather than making a call wait
//! for stderr ([`BatchWriter::dropped`], `greeter_log_lines_dropped_total`).

use std::{
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing_subscriber::fmt::MakeWriter;

/// How long a batch may gather after its first line: lines show up at most this late.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// A batch this large is written without waiting out the interval.
pub const HIGH_WATER: usize = 64 << 10;

/// Bytes waiting to be written at most (about 7,000 access lines); past that, lines are dropped.
pub const MAX_QUEUED_BYTES: usize = 2 << 20;

/// Appends lines for the writer thread of [`spawn`]. One per server, shared by every thread.
#[derive(Debug, Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread: a first line, a full batch, or the end.
    wake: Condvar,
    dropped: AtomicU64,
    high_water: usize,
    max_queued: usize,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<u8>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-written (one `extend`).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Stops the writer thread when dropped, after it has written every line appended before.
#[derive(Debug)]
#[must_use = "dropping the guard stops the log writer"]
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out` (stderr, for the server).
///
/// # Errors
/// When the thread cannot be started.
pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(BatchWriter, WriterGuard)> {
    spawn_with(out, HIGH_WATER, MAX_QUEUED_BYTES)
}

fn spawn_with<W: Write + Send + 'static>(
    mut out: W,
    high_water: usize,
    max_queued: usize,
) -> io::Result<(BatchWriter, WriterGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        high_water,
        max_queued,
    });
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("greeter-log".into())
        .spawn(move || write_batches(&writer, &mut out))?;
    Ok((
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        WriterGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The writer thread: sleeps until a line arrives, lets the batch gather, writes it, again.
fn write_batches(shared: &Shared, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.lines.is_empty() && !state.closed {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let deadline = Instant::now() + FLUSH_INTERVAL;
        while !state.closed && state.lines.len() < shared.high_water {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = (shared.wake.wait_timeout(state, left))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::swap(&mut state.lines, &mut batch);
        let closed = state.closed;
        drop(state);
        // Nothing to do about a failing stderr but go on: the lines are lost either way.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closed {
            return;
        }
    }
}

impl BatchWriter {
    /// Lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues one whole line (or drops and counts it when the buffer is full).
    pub(super) fn append(&self, line: &[u8]) {
        let shared = &*self.shared;
        let mut state = shared.lock();
        if state.closed || state.lines.len() + line.len() > shared.max_queued {
            drop(state);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = state.lines.len();
        state.lines.extend_from_slice(line);
        let filled = before < shared.high_water && state.lines.len() >= shared.high_water;
        drop(state);
        if before == 0 || filled {
            shared.wake.notify_one();
        }
    }
}

/// Each `write` is one whole line: tracing-subscriber formats a line, then writes it at once.
impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer thread wrote, and how many writes it took.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut out = self.0.lock().unwrap();
            out.0.extend_from_slice(buf);
            out.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Out {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }

        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn write_line(writer: &BatchWriter, line: &str) {
        (&*writer).write_all(line.as_bytes()).unwrap();
    }

    /// Every line appended before the guard is dropped is written, in order, in few writes.
    #[test]
    fn lines_are_written_in_order_and_in_batches() {
        let out = Out::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        let lines: Vec<String> = (0..1000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            write_line(&writer, line);
        }
        drop(guard);
        assert_eq!(out.text(), lines.concat());
        assert!(out.writes() < 100, "{} writes for 1000 lines", out.writes());
        assert_eq!(writer.dropped(), 0);
    }

    /// A batch gathers for the interval after its first line: lines trickling in meanwhile share
    /// its write rather than waking the writer one by one. Each write but the last covers at least
    /// an interval, however slowly this machine runs the loop.
    #[test]
    fn lines_trickling_in_share_a_write() {
        let out = Out::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        let started = Instant::now();
        for i in 0..100 {
            write_line(&writer, &format!("line {i}\n"));
            std::thread::sleep(Duration::from_micros(100));
        }
        let took = started.elapsed();
        drop(guard);
        let most = took.as_micros() / FLUSH_INTERVAL.as_micros() + 2;
        assert!(
            out.writes() as u128 <= most,
            "{} writes for 100 lines in {took:?}",
            out.writes()
        );
    }

    /// Lines show up without a flush from the caller: the interval writes them.
    #[test]
    fn a_lone_line_is_written_after_the_interval() {
        let out = Out::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        write_line(&writer, "alone\n");
        let waited = Instant::now();
        while out.text().is_empty() {
            assert!(waited.elapsed() < Duration::from_secs(10), "never written");
            std::thread::sleep(FLUSH_INTERVAL);
        }
        assert_eq!(out.text(), "alone\n");
    }

    /// A line that finds the writer asleep wakes it: the writer sleeps without a timeout while
    /// the buffer is empty (an idle server wakes for nothing), so the line must.
    #[test]
    fn a_line_wakes_the_sleeping_writer() {
        let out = Out::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        let written = |text: &str| {
            let waited = Instant::now();
            while out.text() != text {
                assert!(
                    waited.elapsed() < Duration::from_secs(10),
                    "{text:?} never written"
                );
                std::thread::sleep(FLUSH_INTERVAL);
            }
        };
        write_line(&writer, "first\n");
        written("first\n");
        // Time for the writer to go back to sleep on the empty buffer; the check below passes
        // however long it takes when lines wake it, and fails when they do not.
        std::thread::sleep(Duration::from_millis(100));
        write_line(&writer, "second\n");
        written("first\nsecond\n");
    }

    /// A full buffer drops lines whole and counts them; what fits is still written.
    #[test]
    fn a_full_buffer_drops_and_counts_whole_lines() {
        // A writer that blocks until released, so the buffer cannot drain.
        let gate = Arc::new(Mutex::new(()));
        struct Blocked(Arc<Mutex<()>>, Out);
        impl Write for Blocked {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let _held = self.0.lock().unwrap();
                self.1.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = Out::default();
        let held = gate.lock().unwrap();
        let (writer, guard) = spawn_with(Blocked(Arc::clone(&gate), out.clone()), 10, 100).unwrap();
        // The first batch leaves for the blocked writer; then the buffer holds 100 bytes.
        let (a, b) = (
            format!("{}\n", "a".repeat(9)),
            format!("{}\n", "b".repeat(9)),
        );
        write_line(&writer, &a);
        let waited = Instant::now();
        while !writer.shared.lock().lines.is_empty() {
            assert!(waited.elapsed() < Duration::from_secs(10), "never taken");
            std::thread::yield_now();
        }
        for _ in 0..12 {
            write_line(&writer, &b);
        }
        // Read before the writer is released: a failed assertion would unwind with the gate
        // held and hang in the guard's join.
        let dropped = writer.dropped();
        drop(held);
        drop(guard);
        assert_eq!(dropped, 2);
        assert_eq!(out.text(), a + &b.repeat(10));
    }

    /// After the guard is gone, lines are dropped (and counted) rather than queued for no one.
    #[test]
    fn lines_after_the_end_are_dropped() {
        let out = Out::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        drop(guard);
        write_line(&writer, "late\n");
        assert_eq!(writer.dropped(), 1);
        assert_eq!(out.text(), "");
    }
}
