//! What the alerts and the dashboard read besides the call metrics: the build serving and the
//! configured worst-case memory, as the binary exports them, agreeing with what the operator's
//! own commands print (`greeter --version`, `greeter config check`).

use crate::common::{BinaryServer, greeter_bin, scrape};

fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("{prefix} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn build_info_and_the_worst_case_match_what_the_binary_prints() {
    let dir = tempfile::tempdir().unwrap();
    // Quotas on: the worst case has a term more than the embedded default's.
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[quota]\nenabled = true\nmax_callers = 50000\n").unwrap();
    let server = BinaryServer::start(&config, &[]);
    let text = scrape(server.metrics_addr.unwrap()).await;

    let version = greeter_bin().arg("--version").output().unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    // "greeter 0.1.0 (commit abc123)"
    let (number, commit) = version
        .trim()
        .strip_prefix("greeter ")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|rest| rest.split_once(" (commit "))
        .unwrap_or_else(|| panic!("{version}"));
    let series = format!("greeter_build_info{{version=\"{number}\",commit=\"{commit}\"}} ");
    assert_eq!(value(&text, &series), 1.0);

    let check = greeter_bin()
        .args(["config", "check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let printed = String::from_utf8(check.stdout).unwrap();
    let mib: u64 = printed
        .lines()
        .find_map(|l| l.strip_prefix("worst-case memory: "))
        .and_then(|rest| rest.split_once(" MiB"))
        .unwrap_or_else(|| panic!("{printed}"))
        .0
        .parse()
        .unwrap();
    let bytes = value(&text, "greeter_memory_worst_case_bytes ") as u64;
    assert_eq!(bytes.div_ceil(1 << 20), mib, "{bytes} bytes, {printed}");
}
