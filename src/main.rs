//! The command line: parse flags, set up logging, load and check the config, bind the sockets,
//! run until SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use consul_dns_forwarder::config::{Config, Overrides};
use consul_dns_forwarder::{run, server, Bound};

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
    #[arg(long)]
    listen: Vec<String>,
    /// Upstream resolver ADDR[:PORT] (repeatable). Default: the nameservers in /etc/resolv.conf.
    #[arg(long)]
    upstream: Vec<String>,
    /// Consul agent HTTP API base URL (repeatable, tried in order).
    #[arg(long = "consul-http")]
    consul_http: Vec<String>,
    /// Consul agent DNS address ADDR:PORT (repeatable); selects consul.mode = "dns".
    #[arg(long = "consul-dns")]
    consul_dns: Vec<String>,
    /// Serve Consul names from this JSON file instead of Consul.
    #[arg(long = "catalog-file")]
    catalog_file: Option<PathBuf>,
    /// Metrics and health endpoint ADDR:PORT.
    #[arg(long = "metrics-listen")]
    metrics_listen: Option<String>,
    /// Demo mode: listen on 127.0.0.1:1053 and serve the built-in demo catalog.
    #[arg(long)]
    dev: bool,
    /// Log format.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a config file and print every problem with file, line and key.
    CheckConfig,
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
    let cli = Cli::parse();
    init_tracing(cli.log_format);

    if let Some(Command::CheckConfig) = cli.command {
        let Some(path) = &cli.config else {
            eprintln!("check-config needs --config FILE");
            return ExitCode::from(2);
        };
        return match Config::load(path) {
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

    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        consul_http: cli.consul_http.clone(),
        consul_dns: cli.consul_dns.clone(),
        catalog_file: cli.catalog_file.clone(),
        metrics_listen: cli.metrics_listen.clone(),
        dev: cli.dev,
    };
    let mut config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Err(errors) = config.apply_overrides(&overrides) {
        eprintln!("{errors}");
        return ExitCode::from(2);
    }
    if let Err(e) = config.resolve_system_upstreams() {
        // The demo must start on any machine: without usable nameservers it still serves the
        // demo catalog, and forwarded names get SERVFAIL. A loop is refused even then.
        if cli.dev && config.upstream.servers.is_empty() {
            tracing::warn!("{e}; --dev continues without upstream resolvers");
        } else {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    }

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
    match runtime.block_on(serve(config, cli.dev)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: Config, dev: bool) -> anyhow::Result<()> {
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
    let consul_source = if !config.consul.enabled {
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
    };
    tracing::info!(
        listen = %listen.join(","),
        upstream = %config.upstream.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        consul = %consul_source,
        metrics = %metrics.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".to_owned(), |a| a.to_string()),
        "consul-dns-forwarder serving"
    );
    if dev {
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
    run(
        config,
        Bound { dns, metrics },
        prometheus::Registry::new(),
        shutdown,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
