//! `process_*` metrics, as client_golang's process collector names them, read from `/proc/self`
//! at each scrape (prometheus-client has no process collector). Where `/proc` is missing (not
//! Linux) or a file cannot be read, the affected metrics are left out rather than reported as 0.

use std::fs;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// Clock ticks per second of the `/proc` CPU times: fixed at 100 by the kernel ABI on every
/// architecture Linux exposes to user space (`USER_HZ`), as prometheus/procfs assumes too.
const USER_HZ: f64 = 100.0;

pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector {
        start_time_seconds: start_time_seconds(),
    }));
}

#[derive(Debug)]
struct ProcessCollector {
    /// Read once: it never changes.
    start_time_seconds: Option<f64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = Stat::read();
        if let Some(stat) = &stat {
            let cpu = ConstCounter::new(stat.cpu_seconds());
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?)?;
        }
        let mut gauge = |name: &str, help: &str, value: Option<f64>| {
            let Some(value) = value else {
                return Ok(());
            };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds(),
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max_fds(),
        )?;
        let status = fs::read_to_string("/proc/self/status").ok();
        let status_kib = |key| status.as_deref().and_then(|s| kib_field(s, key));
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            status_kib("VmSize:"),
        )?;
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            status_kib("VmRSS:"),
        )?;
        gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds,
        )
    }
}

/// The fields of `/proc/self/stat` used here.
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
}

impl Stat {
    fn read() -> Option<Self> {
        Self::parse(&fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// Fields after the command name, which is in parentheses and may itself hold spaces and
    /// parentheses: everything after the last `)` is space-separated, starting at field 3.
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        // Field n of proc(5) is fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        Some(Self {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            start_ticks: field(22)?,
        })
    }

    fn cpu_seconds(&self) -> f64 {
        (self.utime_ticks + self.stime_ticks) as f64 / USER_HZ
    }
}

fn start_time_seconds() -> Option<f64> {
    let boot = fs::read_to_string("/proc/stat").ok()?;
    let boot_time: u64 = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot_time as f64 + Stat::read()?.start_ticks as f64 / USER_HZ)
}

fn open_fds() -> Option<f64> {
    Some(fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_fds() -> Option<f64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(f64::INFINITY),
        n => n.parse().ok(),
    }
}

/// A `Key:   1234 kB` line of `/proc/self/status`, in bytes.
fn kib_field(status: &str, key: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_survives_a_command_name_with_spaces_and_parentheses() {
        let line = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 \
                    123456 1000 200 18446744073709551615";
        let stat = Stat::parse(line).unwrap();
        assert_eq!((stat.utime_ticks, stat.stime_ticks), (250, 50));
        assert_eq!(stat.start_ticks, 123_456);
        assert!((stat.cpu_seconds() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn status_sizes_are_in_bytes() {
        let status = "Name:\tgreeter\nVmSize:\t  2048 kB\nVmRSS:\t    512 kB\n";
        assert_eq!(kib_field(status, "VmSize:"), Some(2_097_152.0));
        assert_eq!(kib_field(status, "VmRSS:"), Some(524_288.0));
        assert_eq!(kib_field(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_is_described() {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_max_fds ",
            "process_virtual_memory_bytes ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
        ] {
            assert!(out.contains(&format!("\n{name}")), "{name} in\n{out}");
        }
    }
}
