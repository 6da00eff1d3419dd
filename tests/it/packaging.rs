//! The packages a user installs, built and used as a user would: the Debian package of
//! scripts/build-deb.sh (dpkg-deb -I/-c, installed into a scratch root by dpkg with its
//! maintainer scripts, `systemd-analyze verify` on the installed units, the installed binary's
//! --version and check-config, the binary run as the package's system user answering DNS), and
//! the container image of packaging/Containerfile (built by podman, `podman image inspect`, run
//! as its non-root user with only CAP_NET_BIND_SERVICE, answering DNS on port 53 in its own
//! network namespace).
//!
//! Ignored by default: the packages ship the release binary, so these run in scripts/test.sh's
//! release pass (`cargo test --release --test it -- --ignored`), where BIN is that binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::dnssec::require;
use crate::support::e2e::dig_command;
use crate::support::{free_port, run_ok, Running as KillOnDrop, BIN};

const NAME: &str = "consul-dns-forwarder";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long the packaged binary may take to answer its first query.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// The image's user (packaging/Containerfile: distroless's "nonroot").
const IMAGE_USER: &str = "65532:65532";
/// CAP_NET_BIND_SERVICE alone, as /proc/PID/status prints a capability set.
const NET_BIND_SERVICE_ONLY: &str = "0000000000000400";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// What `--version` must print: the version and the commit of this checkout.
fn expected_version_line() -> String {
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".to_owned(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        });
    format!("{NAME} {VERSION} (revision {revision})")
}

/// The shipped binary has no DWARF (Cargo.toml's release profile), only its symbol table.
fn assert_stripped(binary: &Path) {
    let sections = stdout(Command::new("readelf").args(["-S", "-W"]).arg(binary));
    assert!(
        !sections.contains(".debug_info"),
        "{} carries debug info: build it with --release",
        binary.display()
    );
    let size = std::fs::metadata(binary).expect("binary").len();
    println!("shipped binary: {} bytes", size);
}

/// Runs `cmd` (the forwarder with `--dev --listen 127.0.0.1:PORT`, or a command that enters its
/// network namespace) and waits, bounded, until `dig` through `dig_prefix` gets the demo answer.
fn wait_for_demo_answer(dig_prefix: &[&str], port: u16) -> String {
    let deadline = Instant::now() + ANSWER_WITHIN;
    loop {
        let mut dig = Command::new(dig_prefix.first().copied().unwrap_or("dig"));
        let inner = dig_command(port, &["+short", "web.service.consul"]);
        if dig_prefix.is_empty() {
            dig = inner;
        } else {
            dig.args(&dig_prefix[1..])
                .arg(inner.get_program())
                .args(inner.get_args());
        }
        let out = dig.output().expect("dig runs (bind9-dnsutils)");
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && answer.contains("10.10.0.11") {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no demo answer within {ANSWER_WITHIN:?}: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A directory that the package's system user can traverse (tempdirs are 0700).
fn world_readable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn build_deb(out: &Path) -> PathBuf {
    let mut build = Command::new(repo().join("scripts/build-deb.sh"));
    build.arg(out).env("BIN", BIN).stderr(Stdio::inherit());
    PathBuf::from(stdout(&mut build).trim())
}

fn check_deb_metadata(deb: &Path) {
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(deb));
    println!("dpkg-deb -I:\n{info}");
    for field in [
        format!("Package: {NAME}"),
        format!("Version: {VERSION}-1"),
        "Depends: libc6 (>= 2.".to_owned(),
    ] {
        assert!(info.contains(&field), "{field} in dpkg-deb -I: {info}");
    }
    let conffiles = stdout(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/consul-dns-forwarder.toml");
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    println!("dpkg-deb -c:\n{listing}");
    for path in [
        "./usr/bin/consul-dns-forwarder",
        "./usr/lib/systemd/system/consul-dns-forwarder.service",
        "./usr/lib/systemd/system/consul-dns-forwarder.service.d/user.conf",
        "./usr/lib/sysusers.d/consul-dns-forwarder.conf",
        "./etc/consul-dns-forwarder.toml",
        "./usr/share/man/man1/consul-dns-forwarder.1.gz",
        "./usr/share/man/man1/consul-dns-forwarder-check-config.1.gz",
        "./usr/share/bash-completion/completions/consul-dns-forwarder",
        "./usr/share/zsh/vendor-completions/_consul-dns-forwarder",
        "./usr/share/fish/vendor_completions.d/consul-dns-forwarder.fish",
        "./usr/share/doc/consul-dns-forwarder/copyright",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} in the package"
        );
    }
    assert!(
        listing
            .lines()
            .all(|l| l.contains(" root/root ") && !l.contains("/usr/local/")),
        "every file root-owned, nothing in /usr/local"
    );
}

/// `dpkg --root` with the maintainer scripts run outside a chroot (DPKG_ROOT set), as for
/// bootstrapping a system: the scratch root has no shell of its own. The libc6 the package
/// depends on is the host's, not in the scratch root's dpkg database.
fn dpkg_in(root: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args);
    run_ok(&mut cmd)
}

fn scratch_root() -> tempfile::TempDir {
    let root = world_readable_tempdir();
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    std::fs::write(root.path().join("var/lib/dpkg/status"), "").expect("status");
    root
}

/// uid:gid of the package's system user in the root's /etc/passwd, made by postinst.
fn system_user(root: &Path) -> (String, String) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("postinst made a user");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("consul-dns-forwarder:"))
        .unwrap_or_else(|| panic!("the system user in /etc/passwd: {passwd}"));
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields[6], "/usr/sbin/nologin", "no login shell: {line}");
    (fields[2].to_owned(), fields[3].to_owned())
}

/// systemd's own check of the installed units, drop-in included, with the paths pointed into the
/// scratch root.
fn verify_units(root: &Path) {
    let units = tempfile::tempdir().expect("tmp");
    let installed = root.join("usr/lib/systemd/system");
    let bin = root.join("usr/bin").join(NAME);
    let conf = root.join("etc/consul-dns-forwarder.toml");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(installed.join("."))
            .arg(units.path()),
    );
    let service = units.path().join("consul-dns-forwarder.service");
    let text = std::fs::read_to_string(&service).expect("unit");
    assert!(
        text.contains("ExecStart=/usr/bin/consul-dns-forwarder "),
        "{text}"
    );
    let local = text
        .replace("/usr/bin/consul-dns-forwarder", &bin.display().to_string())
        .replace(
            "/etc/consul-dns-forwarder.toml",
            &conf.display().to_string(),
        );
    std::fs::write(&service, local).expect("write");
    let mut verified = vec![service.as_path()];
    let socket = units.path().join("consul-dns-forwarder.socket");
    if socket.exists() {
        verified.push(&socket);
    }
    crate::support::systemd::verify(units.path(), &verified);
}

/// The installed binary as the package's user: no capability, so an unprivileged port.
fn run_as_system_user(root: &Path) {
    if !nix_is_root() {
        println!("SKIPPED: not root, the binary was not run as the package's system user");
        return;
    }
    let (uid, gid) = system_user(root);
    let port = free_port();
    let _forwarder = KillOnDrop(
        Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "--"])
            .arg(root.join("usr/bin").join(NAME))
            .args(["--config"])
            .arg(root.join("etc/consul-dns-forwarder.toml"))
            .args(["--dev", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .spawn()
            .expect("setpriv"),
    );
    let answer = wait_for_demo_answer(&[], port);
    println!(
        "as uid {uid}: web.service.consul -> {}",
        answer.replace('\n', " ")
    );
}

fn nix_is_root() -> bool {
    stdout(Command::new("id").arg("-u")).trim() == "0"
}

#[test]
#[ignore = "release build: scripts/test.sh's release pass"]
fn deb_package_installs_verifies_and_serves() {
    require("dpkg-deb", "dpkg");
    let out = tempfile::tempdir().expect("tmp");
    let deb = build_deb(out.path());
    check_deb_metadata(&deb);

    let root = scratch_root();
    let root = root.path();
    dpkg_in(root, &["-i", &deb.display().to_string()]);
    let status = stdout(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["-s", NAME]),
    );
    assert!(status.contains("Status: install ok installed"), "{status}");
    system_user(root);
    let bin = root.join("usr/bin").join(NAME);
    assert_stripped(&bin);

    let version = stdout(Command::new(&bin).arg("--version"));
    assert_eq!(version.trim(), expected_version_line());
    let conf = root.join("etc/consul-dns-forwarder.toml");
    let checked = stdout(
        Command::new(&bin)
            .arg("check-config")
            .arg("--config")
            .arg(&conf),
    );
    assert!(checked.contains("OK"), "{checked}");
    let man =
        std::fs::read(root.join("usr/share/man/man1/consul-dns-forwarder.1.gz")).expect("man");
    assert!(man.len() > 200, "a man page, not an empty file");
    let bash = root
        .join("usr/share/bash-completion/completions")
        .join(NAME);
    run_ok(Command::new("bash").arg("-c").arg(format!(
        "source {} && complete -p consul-dns-forwarder",
        bash.display()
    )));

    verify_units(root);
    run_as_system_user(root);

    // Purge: the binary and the conffile go.
    dpkg_in(root, &["--purge", NAME]);
    assert!(!bin.exists() && !conf.exists(), "purge removes the files");
}

/// A runtime base made on this machine (nothing can be pulled here): the shared libraries the
/// binary links, from the host, as a one-layer image.
fn import_host_base(tag: &str) {
    let files = tempfile::tempdir().expect("tmp");
    let ldd = stdout(Command::new("ldd").arg(BIN));
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let dest = files.path().join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    let tarball = files.path().join("base.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(files.path())
            .args(["--exclude", "./base.tar", "-cf"])
            .arg(&tarball)
            .arg("."),
    );
    run_ok(Command::new("podman").arg("import").arg(&tarball).arg(tag));
}

/// The build context of the prebuilt path: the files the Containerfile copies, as in the
/// repository, with the binary where `cargo build --release` puts it.
fn container_context() -> tempfile::TempDir {
    let ctx = tempfile::tempdir().expect("tmp");
    for file in [
        "packaging/Containerfile",
        "packaging/container.toml",
        ".containerignore",
    ] {
        let dest = ctx.path().join(file);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(repo().join(file), dest).expect("copy");
    }
    let bin = ctx.path().join("target/release").join(NAME);
    std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
    std::fs::copy(BIN, &bin).expect("copy binary");
    ctx
}

/// One field of `podman image inspect`, as JSON.
fn inspect(image: &str, format: &str) -> serde_json::Value {
    let text = stdout(Command::new("podman").args(["image", "inspect", "--format", format, image]));
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{format}: {e}: {text}"))
}

fn check_image_config(image: &str) {
    let user = inspect(image, "{{json .Config.User}}");
    assert_eq!(user, IMAGE_USER, "non-root user");
    let entrypoint = inspect(image, "{{json .Config.Entrypoint}}");
    assert_eq!(
        entrypoint,
        serde_json::json!(["/usr/bin/consul-dns-forwarder"])
    );
    let ports = inspect(image, "{{json .Config.ExposedPorts}}");
    let ports: Vec<&String> = ports.as_object().expect("ports").keys().collect();
    assert_eq!(ports, ["53/tcp", "53/udp", "9153/tcp"]);
    let labels = inspect(image, "{{json .Config.Labels}}");
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.licenses"], "MPL-2.0");
    let size = inspect(image, "{{json .Size}}");
    println!(
        "podman image inspect {image}: User {user}, Entrypoint {entrypoint}, ExposedPorts {ports:?}, \
         Labels {labels}, Size {size}"
    );
}

/// podman on the test machines: crun 1.8 refuses cgroup v1 hybrid mode, so runc; podman's
/// default rlimits raise hard limits, which needs CAP_SYS_RESOURCE the sandbox doesn't give.
const PODMAN_RUN: &[&str] = &[
    "--runtime",
    "runc",
    "run",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// The image's own config on port 53 of the container's own network namespace (loopback only:
/// `--network none`), as its non-root user with only CAP_NET_BIND_SERVICE; asked with dig from
/// inside that namespace (nsenter), then `/ready` on the metrics port.
fn run_image(image: &str) {
    let name = format!("cdf-test-{}", std::process::id());
    let mut run = Command::new("podman");
    run.args(PODMAN_RUN)
        .args(["--rm", "-d", "--name", &name, "--network", "none"])
        .args(["--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", image])
        .args([
            "--config",
            "/etc/consul-dns-forwarder/consul-dns-forwarder.toml",
        ])
        .args(["--dev", "--listen", "0.0.0.0:53"]);
    run_ok(&mut run);
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("podman")
                .args(["rm", "-f", "-t", "1", &self.0])
                .output();
        }
    }
    let _remove = Remove(name.clone());
    let pid = stdout(Command::new("podman").args(["inspect", "-f", "{{.State.Pid}}", &name]));
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("status");
    let field = |key: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "65532", "{proc_status}");
    assert_eq!(field("CapEff:"), NET_BIND_SERVICE_ONLY, "{proc_status}");
    let netns = format!("--net=/proc/{}/ns/net", pid.trim());
    let answer = wait_for_demo_answer(&["nsenter", &netns], 53);
    println!(
        "in the container, as 65532: web.service.consul -> {}",
        answer.replace('\n', " ")
    );
    let ready = stdout(Command::new("nsenter").args([
        &netns,
        "curl",
        "-sf",
        "http://127.0.0.1:9153/ready",
    ]));
    println!("/ready: {}", ready.trim());
    let logs = run_ok(Command::new("podman").args(["logs", &name]));
    assert!(String::from_utf8_lossy(&logs.stderr).contains("serving"));
}

#[test]
#[ignore = "release build: scripts/test.sh's release pass"]
fn container_image_builds_and_serves_as_non_root() {
    require("podman", "podman");
    require("runc", "runc");
    let base = format!("localhost/cdf-test-base:{}", std::process::id());
    import_host_base(&base);
    let image = format!("localhost/{NAME}:{VERSION}");
    let ctx = container_context();
    let revision = expected_version_line();
    let revision = revision
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .trim_end_matches(')');
    run_ok(
        Command::new("podman")
            .args(["build", "-f", "packaging/Containerfile", "-t", &image])
            .args(["--build-arg", &format!("RUNTIME_BASE={base}")])
            .args(["--build-arg", "BINARY_FROM=prebuilt"])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .arg(".")
            .current_dir(ctx.path()),
    );
    check_image_config(&image);
    let labels = inspect(&image, "{{json .Config.Labels}}");
    assert_eq!(labels["org.opencontainers.image.revision"], revision);
    run_image(&image);
    let _ = Command::new("podman").args(["rmi", &base]).output();
}
