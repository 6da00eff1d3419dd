//! systemd's own check of unit files (`systemd-analyze verify`), for the shipped unit and the
//! units installed by the Debian package.

use std::path::Path;
use std::process::Command;

/// Verifies `units`, with drop-ins and other units looked up first in `dir`. Prints SKIPPED and
/// returns when systemd-analyze is not installed. Fails on any complaint about a unit of ours.
pub fn verify(dir: &Path, units: &[&Path]) {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("SKIPPED: systemd-analyze is not installed, the unit was not verified by systemd");
        return;
    };
    println!(
        "verifying with {}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );
    let out = Command::new("systemd-analyze")
        // The trailing colon: then the default search path.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .arg("verify")
        .args(units)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("consul-dns-forwarder"),
        "systemd-analyze complains about the unit: {stderr}"
    );
}
