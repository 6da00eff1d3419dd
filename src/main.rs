//! The command line: parse flags, set up logging, load and check the config, bind the sockets,
//! run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use consul_dns_forwarder::config::{self, Config, ConfigError, Overrides};
use consul_dns_forwarder::systemd::{Inherited, Notifier};
use consul_dns_forwarder::{logging, run_service, server, Bound, Reload};

#[derive(Parser, Debug)]
#[command(
    name = "consul-dns-forwarder",
    version,
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
    match runtime.block_on(serve(config, cli.dev, inherited, load)) {
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
    let per = config.server.udp_sockets_per_address;
    let dns = match inherited {
        // Socket activation: systemd bound them (port 53 without a capability here).
        Some(sockets) => sockets
            .into_listeners(per)
            .context("cannot use the sockets passed by systemd (LISTEN_FDS)")?,
        None => server::bind(&config.server.listen, per)?,
    };
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
    let upstream = config
        .upstream
        .servers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let metrics_addr = metrics
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or("off".to_owned(), |a| a.to_string());
    // Logged once the answer sources are built (with READY=1): a file that cannot be used
    // fails the start before it.
    let notify = Notifier::from_env().on_serving(move || {
        tracing::info!(
            listen = %listen.join(","),
            upstream = %upstream,
            consul = %consul_source,
            metrics = %metrics_addr,
            "consul-dns-forwarder serving"
        );
    });
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
