//! The command line: parse flags, set up logging, load and check the config, bind the sockets,
//! run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use consul_dns_forwarder::config::{self, Config, ConfigError, Overrides};
use consul_dns_forwarder::systemd::{Inherited, Notifier};
use consul_dns_forwarder::{explain, logging, run_service, server, Bound, Reload};

/// `--version`: the package version and the git commit it was built from (build.rs; "unknown"
/// when built from a tarball without .git).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("CONSUL_DNS_FORWARDER_REVISION"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "consul-dns-forwarder",
    version = VERSION,
    about = "DNS for *.consul from Consul's health API, everything else forwarded and cached"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see conf/consul-dns-forwarder.toml); flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Listen address ADDR:PORT, UDP and TCP (repeatable). Default 127.0.0.1:53 and [::1]:53.
    #[arg(long, global = true)]
    listen: Vec<String>,
    /// Upstream resolver ADDR[:PORT] (repeatable). Default: the nameservers in /etc/resolv.conf.
    #[arg(long, global = true)]
    upstream: Vec<String>,
    /// Consul agent HTTP API base URL (repeatable, tried in order).
    #[arg(long = "consul-http", global = true)]
    consul_http: Vec<String>,
    /// Consul agent DNS address ADDR:PORT (repeatable); selects consul.mode = "dns".
    #[arg(long = "consul-dns", global = true)]
    consul_dns: Vec<String>,
    /// Serve Consul names from this JSON file instead of Consul.
    #[arg(long = "catalog-file", global = true)]
    catalog_file: Option<PathBuf>,
    /// Metrics and health endpoint ADDR:PORT.
    #[arg(long = "metrics-listen", global = true)]
    metrics_listen: Option<String>,
    /// Demo mode: listen on 127.0.0.1:1053 and serve the built-in demo catalog.
    #[arg(long, global = true)]
    dev: bool,
    /// Log format (default: log.format in the config file, else text).
    #[arg(long = "log-format", value_enum, global = true)]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the configuration (the file given with --config, else the defaults, and the flags
    /// over it) as a start would, without binding anything, and print every problem with its
    /// key (and file and line). Exit code 2 when there is one.
    CheckConfig,
    /// Ask the running forwarder why NAME is answered as it is: how it was read, every instance
    /// of the service with its checks and why it is or is not in the answer, the view's age,
    /// the TTL and its rule, the reply it would send now.
    Explain {
        /// The name, e.g. web.service.consul.
        name: String,
        /// The record type (default A).
        #[arg(value_name = "TYPE")]
        qtype: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
        /// The forwarder's HTTP endpoint ADDR:PORT. Default: metrics.listen of --config (or
        /// --metrics-listen), else 127.0.0.1:9153.
        #[arg(long)]
        endpoint: Option<String>,
        /// Ask as a UDP client without EDNS (nginx, glibc) would: consul.udp_answer_limit applies.
        #[arg(long = "no-edns")]
        no_edns: bool,
        /// The page of instances (100 a page) of a large service.
        #[arg(long)]
        page: Option<usize>,
    },
}

/// `consul-dns-forwarder generate-assets --out-dir DIR`, for packagers (scripts/build-deb.sh):
/// the man pages in DIR/man1/ and the bash, zsh and fish completions in DIR/completions/,
/// generated from the flags above. Parsed apart from `Cli` so that neither the help, the man
/// page nor the completions list it (clap_complete lists hidden subcommands).
#[derive(Parser, Debug)]
#[command(name = "generate-assets")]
struct GenerateAssets {
    #[arg(long = "out-dir")]
    out_dir: PathBuf,
}

fn generate_assets(out_dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let man = out_dir.join("man1");
    let completions = out_dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(
            shell,
            &mut Cli::command(),
            "consul-dns-forwarder",
            &completions,
        )?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for config::LogFormat {
    fn from(f: LogFormat) -> config::LogFormat {
        match f {
            LogFormat::Text => config::LogFormat::Text,
            LogFormat::Json => config::LogFormat::Json,
        }
    }
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "generate-assets")
    {
        let out_dir = GenerateAssets::parse_from(std::env::args_os().skip(1)).out_dir;
        return match generate_assets(&out_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write to {}: {e}", out_dir.display());
                ExitCode::from(1)
            }
        };
    }
    let cli = Cli::parse();
    let cli_format = cli.log_format.map(config::LogFormat::from);

    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        consul_http: cli.consul_http.clone(),
        consul_dns: cli.consul_dns.clone(),
        catalog_file: cli.catalog_file.clone(),
        metrics_listen: cli.metrics_listen.clone(),
        dev: cli.dev,
    };
    if let Some(Command::Explain {
        name,
        qtype,
        json,
        endpoint,
        no_edns,
        page,
    }) = &cli.command
    {
        let request = explain::client::Request {
            name: name.clone(),
            qtype: qtype.clone(),
            json: *json,
            no_edns: *no_edns,
            page: *page,
        };
        return explain_command(&cli, &overrides, endpoint.as_deref(), &request);
    }
    // Until the file has said how to log: the flag's format, or text.
    let early = logging::subscriber(cli_format.unwrap_or_default(), None);
    let loaded =
        tracing::subscriber::with_default(early, || load_config(cli.config.as_deref(), &overrides));
    if let Some(Command::CheckConfig) = cli.command {
        // The same checks as a start, flags included, without binding anything.
        return match loaded {
            Ok(_) => {
                match &cli.config {
                    Some(path) => println!("{}: OK", path.display()),
                    None => println!("the defaults and the flags given: OK"),
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        };
    }
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let format = cli_format.unwrap_or(config.log_format);
    // Also takes the `log` records of dependencies (rustls). Nothing was set before: this
    // cannot fail.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(logging::subscriber(
        format,
        config.log_level.as_deref(),
    ));

    // Before any thread starts: taking the passed sockets unsets LISTEN_FDS and LISTEN_PID.
    let inherited = match Inherited::from_env(&config.server.listen) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime_builder().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let reload_path = cli.config.clone();
    let load: Box<dyn Fn() -> Result<Config, String> + Send + Sync> =
        Box::new(move || load_config(reload_path.as_deref(), &overrides));
    match runtime.block_on(serve(config, cli.dev, inherited, load)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The runtime for the cores this process may run on (its CPU affinity, as `taskset` or
/// systemd's `CPUAffinity=` set it). On one core, a single-threaded runtime: the work-stealing
/// scheduler's single worker only adds its queues' atomics and wake-ups (server CPU per answer,
/// one pinned core, paired rounds: forwarded hits x0.96-0.97, cache misses x0.92-0.99, Consul
/// names no gain; docs/benchmarks.md, step eleven). On more, one worker per core.
fn runtime_builder() -> tokio::runtime::Builder {
    match std::thread::available_parallelism() {
        Ok(cores) if cores.get() > 1 => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
}

/// `explain`: asks the forwarder's HTTP endpoint, prints its answer. Exit 0 when it answered,
/// 1 when it could not be reached or refused, 2 for a bad config or endpoint.
fn explain_command(
    cli: &Cli,
    overrides: &Overrides,
    endpoint: Option<&str>,
    request: &explain::client::Request,
) -> ExitCode {
    let addr = match explain_endpoint(cli, overrides, endpoint) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // One request: a single-threaded runtime is enough.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let fetched = match runtime {
        Ok(rt) => rt
            .block_on(explain::client::fetch(addr, request))
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot start the async runtime: {e}")),
    };
    match fetched {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Where `explain` asks: `--endpoint`, else `metrics.listen` of the config and flags (an
/// unspecified address reached at loopback).
fn explain_endpoint(
    cli: &Cli,
    overrides: &Overrides,
    endpoint: Option<&str>,
) -> Result<std::net::SocketAddr, String> {
    if let Some(e) = endpoint {
        return e
            .parse()
            .map_err(|_| format!("--endpoint {e}: ADDR:PORT expected"));
    }
    file_and_flags(cli.config.as_deref(), overrides)?
        .metrics
        .listen
        .map(explain::client::reachable)
        .ok_or_else(|| "the HTTP endpoint is off (metrics.enabled = false): nothing to ask".into())
}

/// The config file (or the defaults) with the flags over it.
fn file_and_flags(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let mut config = match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    config
        .apply_overrides(overrides)
        .map_err(|e| e.to_string())?;
    Ok(config)
}

/// The config file (or the defaults), the flags over it, and the upstreams from resolv.conf when
/// none are configured. Used at start and on every SIGHUP.
fn load_config(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let mut config = file_and_flags(path, overrides)?;
    // After the flags: `--consul-http` and CONSUL_HTTP_TOKEN can each bring the problem in, and
    // check-config must refuse what the start would.
    config
        .consul
        .check_token_transport()
        .map_err(|e| ConfigError::from(e).to_string())?;
    config.check_host().map_err(|e| e.to_string())?;
    if let Err(e) = config.resolve_system_upstreams() {
        // The demo must start on any machine: without usable nameservers it still serves the
        // demo catalog, and forwarded names get SERVFAIL. A loop is refused even then.
        if overrides.dev && config.upstream.servers.is_empty() {
            tracing::warn!("{e}; --dev continues without upstream resolvers");
        } else {
            return Err(e.to_string());
        }
    }
    Ok(config)
}

/// Where Consul answers come from, for the start-up log line.
fn describe_consul(config: &Config) -> String {
    if !config.consul.enabled {
        "off".to_owned()
    } else if config.consul.demo_catalog {
        "demo catalog".to_owned()
    } else if let Some(f) = &config.consul.catalog_file {
        format!("catalog file {}", f.display())
    } else {
        match config.consul.mode {
            consul_dns_forwarder::config::ConsulMode::Http => format!(
                "http {}",
                config
                    .consul
                    .http
                    .iter()
                    .map(|u| u.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            consul_dns_forwarder::config::ConsulMode::Dns => format!(
                "dns {}",
                config
                    .consul
                    .dns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// The DNS sockets: those systemd passed (socket activation: port 53 without a capability
/// here), else bound now.
fn listeners(config: &Config, inherited: Option<Inherited>) -> anyhow::Result<server::Listeners> {
    let per = config.server.udp_sockets_per_address;
    Ok(match inherited {
        Some(sockets) => sockets
            .into_listeners(per)
            .context("cannot use the sockets passed by systemd (LISTEN_FDS)")?,
        None => server::bind(&config.server.listen, per)?,
    })
}

/// The systemd notifier, which also logs the "serving" line once the answer sources are built
/// (with READY=1): a file that cannot be used fails the start before it.
fn notifier(
    config: &Config,
    dns: &server::Listeners,
    metrics: Option<&tokio::net::TcpListener>,
) -> Notifier {
    let listen: Vec<String> = dns.local_addrs().iter().map(ToString::to_string).collect();
    let consul_source = describe_consul(config);
    let upstream: Vec<String> = config
        .upstream
        .servers
        .iter()
        .map(ToString::to_string)
        .collect();
    let metrics_addr = metrics
        .and_then(|l| l.local_addr().ok())
        .map_or("off".to_owned(), |a| a.to_string());
    Notifier::from_env().on_serving(move || {
        tracing::info!(
            listen = %listen.join(","),
            upstream = %upstream.join(","),
            consul = %consul_source,
            metrics = %metrics_addr,
            "consul-dns-forwarder serving"
        );
    })
}

/// The `--dev` banner: dig commands to try against the demo catalog.
fn print_demo_hints(dns: &server::Listeners) {
    if let Some(addr) = dns.local_addrs().first() {
        let (ip, port) = (addr.ip(), addr.port());
        println!("Demo catalog served on {addr}. Try:");
        for q in [
            "web.service.consul",
            "web.service.consul SRV",
            "_web._tcp.service.consul SRV",
            "v1.web.service.consul",
            "api.service.consul AAAA",
            "node-1.node.consul",
            "missing.service.consul",
        ] {
            println!("  dig @{ip} -p {port} {q}");
        }
    }
}

async fn serve(
    config: Config,
    dev: bool,
    inherited: Option<Inherited>,
    load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
) -> anyhow::Result<()> {
    let dns = listeners(&config, inherited)?;
    let metrics = match config.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            // The demo must start even where the metrics port is taken.
            Err(e) if dev => {
                tracing::warn!(%addr, error = %e, "metrics endpoint not started");
                None
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot listen on {addr} for metrics (metrics.listen / --metrics-listen)"
                    )
                })
            }
        },
        None => None,
    };
    let notify = notifier(&config, &dns, metrics.as_ref());
    if dev {
        print_demo_hints(&dns);
    }
    let shutdown = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down: finishing queries in flight");
    };
    let (tx, trigger) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: configuration reloads are off");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            // A reload already queued covers this one too.
            let _ = tx.try_send(());
        }
    });
    run_service(
        config,
        Bound { dns, metrics },
        prometheus::Registry::new(),
        shutdown,
        Some(Reload { trigger, load }),
        notify,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
