//! A process's resident memory, from /proc. Std only: the memory benchmarks include this file too
//! (`benches/support/counting_alloc.rs`).

/// The resident set of `process` (a pid, or `self`) in KiB, from `/proc/<process>/status`; 0 when
/// it cannot be read.
pub fn vm_rss_kib(process: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
