//! JSON lines, written straight into the subscriber's line buffer.
//!
//! The shape is tracing-subscriber's JSON format with flattened events, so log pipelines see no
//! difference: `timestamp`, `level`, the event's fields (`message` among them), `target`, then
//! `span` (the innermost span: its fields and `name`) and `spans` (every span, outermost first).
//!
//! What differs is the cost, which matters with an access line per call: tracing-subscriber's
//! format pushes every token through an `io::Write` adaptor that re-validates it as UTF-8, and
//! re-parses every span's fields from JSON text for every line logged inside a span; together
//! that was most of what a call's observability cost (benches/observability.rs). Here span fields
//! are kept as a ready JSON fragment and copied, and values are escaped as they are written.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// The event format: one JSON object per line.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

/// The span field format: the members of a JSON object without its braces (`"k":v,"k2":v2`), so
/// that each line can copy them in as they are.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<S> FormatEvent<S, JsonSpanFields> for JsonLines
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        // The line is built in a buffer of our own and handed over whole: each write to
        // `writer` is a dynamic call, and a line is made of dozens of pieces.
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                write_line(ctx, event, &mut line)?;
                let written = writer.write_str(&line);
                // One huge line must not pin its size in every thread for good.
                if line.capacity() > 64 * 1024 {
                    *line = String::with_capacity(512);
                }
                written
            }
            // A value's `Debug` that logs, formatted while this thread formats a line.
            Err(_) => {
                let mut line = String::new();
                write_line(ctx, event, &mut line)?;
                writer.write_str(&line)
            }
        })
    }
}

fn write_line<S>(
    ctx: &FmtContext<'_, S, JsonSpanFields>,
    event: &Event<'_>,
    line: &mut String,
) -> fmt::Result
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    // Events forwarded from the `log` crate carry their real target and level as fields.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());

    line.push_str("{\"timestamp\":\"");
    write_timestamp(line, std::time::SystemTime::now())?;
    line.push_str("\",\"level\":\"");
    line.push_str(meta.level().as_str());
    line.push('"');
    let mut fields = Members::new(line, true);
    event.record(&mut fields);
    fields.result?;
    line.push_str(",\"target\":");
    write_string(line, meta.target())?;

    let current = event
        .parent()
        .and_then(|id| ctx.span(id))
        .or_else(|| ctx.lookup_current());
    if let Some(current) = current {
        line.push_str(",\"span\":");
        write_span(line, &current)?;
        line.push_str(",\"spans\":[");
        for (i, span) in current.scope().from_root().enumerate() {
            if i > 0 {
                line.push(',');
            }
            write_span(line, &span)?;
        }
        line.push(']');
    }
    line.push_str("}\n");
    Ok(())
}

fn write_span<S>(
    line: &mut String,
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) -> fmt::Result
where
    S: for<'span> LookupSpan<'span>,
{
    line.push('{');
    let extensions = span.extensions();
    if let Some(fields) = extensions.get::<FormattedFields<JsonSpanFields>>()
        && !fields.is_empty()
    {
        line.push_str(fields);
        line.push(',');
    }
    line.push_str("\"name\":");
    write_string(line, span.name())?;
    line.push('}');
    Ok(())
}

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = Members::new(&mut writer, false);
        fields.record(&mut members);
        members.result
    }

    /// Fields recorded later (`Span::record`) join the fragment with a comma.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &span::Record<'_>,
    ) -> fmt::Result {
        let after_others = !current.fields.is_empty();
        let mut writer = current.as_writer();
        let mut members = Members::new(&mut writer, after_others);
        fields.record(&mut members);
        members.result
    }
}

/// Writes each field as a `"name":value` member, comma-separated.
struct Members<'a, W> {
    writer: &'a mut W,
    /// Whether a member precedes the next one.
    after_others: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> Members<'a, W> {
    fn new(writer: &'a mut W, after_others: bool) -> Self {
        Self {
            writer,
            after_others,
            result: Ok(()),
        }
    }

    fn member(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.writer
                .write_str(if self.after_others { ",\"" } else { "\"" })?;
            self.after_others = true;
            Escaped(&mut *self.writer).write_str(field.name())?;
            self.writer.write_str("\":")?;
            value(self.writer)
        })();
    }
}

impl<W: fmt::Write> Visit for Members<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| write_string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            write_formatted_string(w, format_args!("{value:?}"))
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |w| {
            write_formatted_string(w, format_args!("{value}"))
        });
    }

    // Numbers as serde_json writes them, with the same crates (itoa, zmij): several times
    // faster than `fmt`, whose machinery dominates the cost of a short line.

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, |w| write_f64(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| w.write_str(if value { "true" } else { "false" }));
    }
}

/// Formatted text as a JSON string, quotes included.
fn write_formatted_string(writer: &mut impl fmt::Write, text: fmt::Arguments<'_>) -> fmt::Result {
    let mut staged = Staged::default();
    if staged.write_fmt(text).is_ok() {
        write_string(writer, staged.as_str())
    } else {
        writer.write_char('"')?;
        Escaped(&mut *writer).write_fmt(text)?;
        writer.write_char('"')
    }
}

/// Collects a formatted value on the stack: `fmt` writes a value in many small pieces, and each
/// write to the line buffer costs a dynamic call and an escape scan. A value longer than this is
/// formatted again, straight to the line.
struct Staged {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Staged {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Staged {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only whole `str`s are copied in")
    }
}

impl fmt::Write for Staged {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let room = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `value` as serde_json writes it: JSON has no NaN or infinity, so those are `null`.
pub(super) fn write_f64(writer: &mut impl fmt::Write, value: f64) -> fmt::Result {
    if value.is_finite() {
        writer.write_str(zmij::Buffer::new().format_finite(value))
    } else {
        writer.write_str("null")
    }
}

/// `micros` microseconds as milliseconds: the text [`write_f64`] gives `micros as f64 / 1000.0`
/// (the shortest that reads back, `12.345`, `0.5`, `3.0`), from integer digits rather than
/// through a float formatter.
pub(super) fn write_millis(writer: &mut impl fmt::Write, micros: u64) -> fmt::Result {
    // Below 2^50 the float's spacing is far finer than a microsecond: the shortest text that reads
    // back is the decimal itself. Past it (35 years) the float formatter decides.
    if micros >= 1 << 50 {
        return write_f64(writer, micros as f64 / 1000.0);
    }
    let mut digits = itoa::Buffer::new();
    writer.write_str(digits.format(micros / 1000))?;
    writer.write_char('.')?;
    let mut fraction = micros % 1000;
    if fraction == 0 {
        return writer.write_char('0');
    }
    let mut place = 100;
    while fraction > 0 {
        writer.write_char(digit(fraction / place))?;
        fraction %= place;
        place /= 10;
    }
    Ok(())
}

/// `s` as a JSON string, quotes included.
pub(super) fn write_string(writer: &mut impl fmt::Write, s: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(&mut *writer).write_str(s)?;
    writer.write_char('"')
}

/// Escapes what a JSON string cannot hold as is: `"`, `\` and control characters. All are ASCII,
/// so they never occur inside a multi-byte UTF-8 sequence and runs between them copy as they are.
struct Escaped<W>(W);

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The index of the first byte of `bytes` that needs escaping. Looks at eight bytes per step:
/// log lines are mostly text that needs none, and this runs over every byte of every line.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Sets the high bit of every byte of `word` that is below `n` (for n <= 0x80).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    // ... and of every byte equal to `b`.
    let equal = |word: u64, b: u8| below(word ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        if below(word, 0x20) | equal(word, b'"') | equal(word, b'\\') != 0 {
            break;
        }
        offset += 8;
    }
    bytes[offset..]
        .iter()
        .position(|&b| needs_escape(b))
        .map(|at| offset + at)
}

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        // Most values need no escaping: find the next byte that does, copy the run before it.
        while let Some(at) = first_to_escape(s.as_bytes()) {
            self.0.write_str(&s[..at])?;
            match s.as_bytes()[at] {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                control => write!(self.0, "\\u{control:04x}")?,
            }
            s = &s[at + 1..];
        }
        self.0.write_str(s)
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it
/// (`2026-11-24T16:21:55.930074Z`), from digits rather than through `fmt` padding.
///
/// Each thread keeps the text up to the second and remakes it when the second changes: a busy
/// server writes many lines a second, and the date's digits were a quarter of a line's cost.
pub(super) fn write_timestamp(
    writer: &mut impl fmt::Write,
    now: std::time::SystemTime,
) -> fmt::Result {
    thread_local! {
        /// The second (since the epoch) and its text, `2026-11-24T16:21:55.`.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            *text = second_text(secs);
        }
        writer.write_str(text)
    })?;
    let micros = since_epoch.subsec_micros();
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        writer.write_char(digit(micros / place))?;
    }
    writer.write_char('Z')
}

/// `2026-11-24T16:21:55.`: the timestamp of second `secs` since the epoch, up to its fraction.
fn second_text(secs: u64) -> String {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    let mut text = String::with_capacity(20);
    let mut put = |width: u32, value: u64, then: char| {
        for place in (0..width).rev() {
            text.push(digit(value / 10u64.pow(place)));
        }
        text.push(then);
    };
    put(4, year, '-');
    put(2, month, '-');
    put(2, day, 'T');
    put(2, second_of_day / 3600, ':');
    put(2, second_of_day / 60 % 60, ':');
    put(2, second_of_day % 60, '.');
    text
}

/// The last decimal digit of `value`.
fn digit(value: impl Into<u64>) -> char {
    char::from_digit((value.into() % 10) as u32, 10).expect("below 10")
}

/// `(year, month, day)` of the day `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// for dates from 1970 on).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt as _};

    use super::*;

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What `emit` logs, formatted as the server formats JSON lines.
    pub fn capture_text(emit: impl FnOnce()) -> String {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonSpanFields)
            .event_format(JsonLines)
            .with_writer(lines.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    fn capture(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        capture_text(emit)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    #[test]
    fn events_are_flat_json_objects_with_their_spans() {
        let lines = capture(|| {
            tracing::info!(target: "t::plain", count = 3u64, ratio = 0.5, ok = true, "hello");
            let outer = tracing::info_span!("outer", request_id = "abc");
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner", n = -1i64, empty = tracing::field::Empty);
            inner.record("empty", "filled");
            let _inner = inner.enter();
            tracing::warn!(peer = %"127.0.0.1:1", "inside");
        });
        assert_eq!(lines.len(), 2);
        let plain = &lines[0];
        assert_eq!(plain["level"], "INFO");
        assert_eq!(plain["target"], "t::plain");
        assert_eq!(plain["message"], "hello");
        assert_eq!(plain["count"], 3);
        assert_eq!(plain["ratio"], 0.5);
        assert_eq!(plain["ok"], true);
        assert!(plain["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(plain.get("span").is_none());

        let inside = &lines[1];
        assert_eq!(inside["level"], "WARN");
        assert_eq!(inside["peer"], "127.0.0.1:1");
        assert_eq!(
            inside["span"],
            serde_json::json!({"n": -1, "empty": "filled", "name": "inner"})
        );
        assert_eq!(
            inside["spans"],
            serde_json::json!([
                {"request_id": "abc", "name": "outer"},
                {"n": -1, "empty": "filled", "name": "inner"}
            ])
        );
    }

    #[test]
    fn the_fast_scan_finds_every_byte_to_escape() {
        for len in 0..40 {
            for at in 0..len {
                for special in [0u8, 0x1f, b'"', b'\\'] {
                    let mut bytes = vec![b'a'; len];
                    // Bytes just outside the special ranges must not match.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b = [b' ', b'#', b'!', b'[', b']', 0x7f, 0xc3][i % 7];
                    }
                    bytes[at] = special;
                    assert_eq!(first_to_escape(&bytes), Some(at), "{bytes:?}");
                }
            }
            assert_eq!(first_to_escape(&vec![b'x'; len]), None);
        }
    }

    /// Against the plain scan, on text that seldom needs escaping (the fast scan's case) and on
    /// any bytes: a word it wrongly passes over would go out unescaped.
    #[test]
    fn the_fast_scan_agrees_with_a_byte_by_byte_one() {
        let mut rng = fastrand::Rng::with_seed(25);
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let rare = rng.u8(..);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.u8(..) < rare {
                        rng.u8(..)
                    } else {
                        rng.u8(0x20..0x7f)
                    }
                })
                .collect();
            let plain = bytes.iter().position(|&b| needs_escape(b));
            assert_eq!(first_to_escape(&bytes), plain, "{bytes:?}");
        }
    }

    #[test]
    fn long_formatted_values_are_written_whole() {
        let long = "x\"y".repeat(200);
        let lines = capture(|| tracing::info!(long = ?long, big = u64::MAX, "{long}"));
        assert_eq!(lines[0]["long"], format!("{long:?}"));
        assert_eq!(lines[0]["message"], long);
        assert_eq!(lines[0]["big"], u64::MAX);
    }

    #[test]
    fn errors_and_128_bit_integers_are_written() {
        let err = std::io::Error::other("disk \"full\"");
        let text = capture_text(|| {
            tracing::info!(
                error = &err as &(dyn std::error::Error + 'static),
                big = u128::MAX,
                small = i128::MIN,
                "failed"
            );
        });
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["error"], "disk \"full\"");
        // Past 64 bits serde_json reads a float: the digits are checked as written.
        assert!(
            text.contains(r#""big":340282366920938463463374607431768211455,"#),
            "{text}"
        );
        assert!(
            text.contains(r#""small":-170141183460469231731687303715884105728,"#),
            "{text}"
        );
    }

    #[test]
    fn timestamps_match_rfc_3339_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut text = String::new();
            let time = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(secs)
                + std::time::Duration::from_micros(micros);
            write_timestamp(&mut text, time).unwrap();
            text
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_537_315, 930_074), "2026-11-24T16:21:55.930074Z");
        // The same second again, from the thread's kept text; then the next one.
        assert_eq!(at(1_795_537_315, 40), "2026-11-24T16:21:55.000040Z");
        assert_eq!(at(1_795_537_316, 0), "2026-11-24T16:21:56.000000Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
        // Past the century (2100 is not a leap year) and on the last day of a 400-year era.
        assert_eq!(at(4_107_585_600, 0), "2100-03-01T12:00:00.000000Z");
        assert_eq!(at(4_133_980_800, 0), "2101-01-01T00:00:00.000000Z");
        assert_eq!(at(13_574_649_599, 0), "2400-02-29T23:59:59.000000Z");
        assert_eq!(at(0, 999_999), "1970-01-01T00:00:00.999999Z");
    }

    #[test]
    fn milliseconds_read_as_the_float_formatter_writes_them() {
        let check = |micros: u64| {
            let (mut direct, mut float) = (String::new(), String::new());
            write_millis(&mut direct, micros).unwrap();
            write_f64(&mut float, micros as f64 / 1000.0).unwrap();
            assert_eq!(direct, float, "{micros} µs");
        };
        (0..=200_000).for_each(check);
        let mut rng = fastrand::Rng::with_seed(25);
        for _ in 0..200_000 {
            let bits = rng.u32(17..=52);
            check(rng.u64(..1 << bits));
        }
        [(1 << 50) - 1, 1 << 50, u64::MAX]
            .into_iter()
            .for_each(check);
    }

    #[test]
    fn strings_are_escaped_and_non_finite_numbers_are_null() {
        let nasty = "quote \" backslash \\ newline \n tab \t bell \u{7} escape \u{1b}[31m ünï";
        let lines = capture(|| {
            tracing::info!(text = nasty, debug = ?nasty, nan = f64::NAN, "m\"sg");
        });
        assert_eq!(lines[0]["text"], nasty);
        assert_eq!(lines[0]["debug"], format!("{nasty:?}"));
        assert_eq!(lines[0]["nan"], serde_json::Value::Null);
        assert_eq!(lines[0]["message"], "m\"sg");
    }
}
