//! The command line: parse flags, set up logging, load and check the config, bind the sockets,
//! run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use consul_dns_forwarder::config::{Config, ConfigError, Overrides};
use consul_dns_forwarder::{run_with_reload, server, Bound, Reload};

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
    /// Log format.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a config file (and any flags given with it) and print every problem with file, line
    /// and key.
    CheckConfig,
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
    init_tracing(cli.log_format);

    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        consul_http: cli.consul_http.clone(),
        consul_dns: cli.consul_dns.clone(),
        catalog_file: cli.catalog_file.clone(),
        metrics_listen: cli.metrics_listen.clone(),
        dev: cli.dev,
    };
    if let Some(Command::CheckConfig) = cli.command {
        // The same checks as a start, flags included, without binding anything.
        let Some(path) = &cli.config else {
            eprintln!("check-config needs --config FILE");
            return ExitCode::from(2);
        };
        return match load_config(Some(path), &overrides) {
            Ok(_) => {
                println!("{}: OK", path.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        };
    }
    let config = match load_config(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let reload_path = cli.config.clone();
    let load: Box<dyn Fn() -> Result<Config, String> + Send + Sync> =
        Box::new(move || load_config(reload_path.as_deref(), &overrides));
    match runtime.block_on(serve(config, cli.dev, load)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The config file (or the defaults), the flags over it, and the upstreams from resolv.conf when
/// none are configured. Used at start and on every SIGHUP.
fn load_config(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let mut config = match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    config
        .apply_overrides(overrides)
        .map_err(|e| e.to_string())?;
    // After the flags: `--consul-http` and CONSUL_HTTP_TOKEN can each bring the problem in, and
    // check-config must refuse what the start would.
    config
        .consul
        .check_token_transport()
        .map_err(|e| ConfigError::from(e).to_string())?;
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
    load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
) -> anyhow::Result<()> {
    let dns = server::bind(&config.server.listen, config.server.udp_sockets_per_address)?;
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
    let listen: Vec<String> = dns.local_addrs().iter().map(ToString::to_string).collect();
    let consul_source = describe_consul(&config);
    tracing::info!(
        listen = %listen.join(","),
        upstream = %config.upstream.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        consul = %consul_source,
        metrics = %metrics.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".to_owned(), |a| a.to_string()),
        "consul-dns-forwarder serving"
    );
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
    run_with_reload(
        config,
        Bound { dns, metrics },
        prometheus::Registry::new(),
        shutdown,
        Some(Reload { trigger, load }),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
