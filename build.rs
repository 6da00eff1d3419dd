//! Sets CONSUL_DNS_FORWARDER_REVISION, the git commit the binary is built from, for `--version`.
//! Taken from that environment variable when set (container builds, distribution packages);
//! else from git, when the package directory is the top of a work tree; else "unknown" (a
//! source tarball without .git, even one unpacked inside some other repository).

use std::path::Path;
use std::process::Command;

const VAR: &str = "CONSUL_DNS_FORWARDER_REVISION";

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn from_git() -> Option<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let top = git(&["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != Path::new(&manifest_dir).canonicalize().ok()? {
        return None;
    }
    // Rebuild when HEAD moves: its file, the branch it points at, the packed refs. Only files
    // that exist: cargo reruns a build script on every build for a missing one.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for dir in [
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ]
    .into_iter()
    .flatten()
    {
        let mut files = vec![format!("{dir}/HEAD"), format!("{dir}/packed-refs")];
        files.extend(branch.iter().map(|b| format!("{dir}/{b}")));
        for f in files.iter().filter(|f| Path::new(f).is_file()) {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}

fn main() {
    println!("cargo:rerun-if-env-changed={VAR}");
    let revision = std::env::var(VAR)
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env={VAR}={revision}");
}
