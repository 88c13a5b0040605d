//! `dmd bench` as a script runs it: the real binary, a small in-process run, and the last line a script
//! reads. No timing is asserted (the figures depend on the machine).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// The numbers of `bench: <ok> delegations, <rate>/s, p50 <a> ms, p99 <b> ms, failures <f>`.
fn parse_last_line(line: &str) -> (u64, f64, f64, f64, u64) {
    let rest = line.strip_prefix("bench: ").expect("prefix");
    let (ok, rest) = rest.split_once(" delegations, ").expect("delegations");
    let (rate, rest) = rest.split_once("/s, p50 ").expect("rate");
    let (p50, rest) = rest.split_once(" ms, p99 ").expect("p50");
    let (p99, failures) = rest.split_once(" ms, failures ").expect("p99");
    let one_decimal = |s: &str| {
        let (_, frac) = s.split_once('.').unwrap_or((s, ""));
        assert!(frac.len() <= 1, "'{s}' has more than one decimal");
        s.parse::<f64>().unwrap()
    };
    assert!(rate.contains('.'), "the rate has one decimal: {rate}");
    (
        ok.parse().unwrap(),
        one_decimal(rate),
        one_decimal(p50),
        one_decimal(p99),
        failures.parse().unwrap(),
    )
}

#[test]
fn a_small_in_process_run_ends_with_the_line_scripts_read() {
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args([
            "bench",
            "--in-process",
            "--delegations",
            "20",
            "--in-flight",
            "5",
            "--no-targets",
        ])
        .output()
        .expect("run dmd bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().expect("some output");
    let (ok, rate, p50, p99, failures) = parse_last_line(last);
    assert_eq!((ok, failures), (20, 0), "{stdout}");
    assert!(rate > 0.0 && p50 > 0.0 && p99 >= p50, "{last}");
    for figure in [
        "per tenth of the sustained run",
        "drain after the last start",
        "latency start → Active on both sides",
        "floor sum",
        "CPU:",
        "stored:",
        "RSS:",
    ] {
        assert!(stdout.contains(figure), "no '{figure}' in\n{stdout}");
    }
}

#[test]
fn json_carries_the_same_figures_and_the_last_line_stays() {
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args([
            "bench",
            "--in-process",
            "--delegations",
            "10",
            "--in-flight",
            "5",
            "--no-targets",
            "--json",
        ])
        .output()
        .expect("run dmd bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let (ok, _, _, _, failures) = parse_last_line(lines[1]);
    assert_eq!(json["ok"], ok);
    assert_eq!(json["failures"], failures);
    assert_eq!(json["tenths_per_s"].as_array().unwrap().len(), 10);
    assert!(json["latency_ms"]["p99"].as_f64().is_some());
    assert!(json["floors_us"]["kv_cas_p50"].as_f64().is_some());
}

#[test]
fn missed_targets_fail_the_exit_code() {
    // Two delegations cannot make ten tenths: a target is missed whatever the machine.
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args([
            "bench",
            "--in-process",
            "--delegations",
            "2",
            "--in-flight",
            "1",
        ])
        .output()
        .expect("run dmd bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.lines().last().unwrap().starts_with("bench: "));
    assert!(stderr.contains("targets missed"), "{stderr}");
}
