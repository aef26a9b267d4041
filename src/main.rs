//! The `sluice` command line: `serve` and `check-config`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice::clock::MonotonicClock;
use sluice::key::HashTag;
use sluice::rules;
use sluice::server::{Addresses, Server};
use sluice::service::{Bounds, HeaderStyle, Limiter};
use sluice::store::{
    FailureMode, Guarded, MemoryStore, RedisSettings, RedisStore, Store, Topology,
};

// glibc's allocator spends a tenth of a busy server's time in malloc and free across threads;
// mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A token-bucket rate-limit service for Envoy's global rate-limit filter.
#[derive(Parser, Debug)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve rate-limit decisions over gRPC (Envoy RLS v3), with an HTTP admin listener.
    Serve(Box<ServeArgs>),
    /// Validate rule files and print what each domain limits; exit 1 if any is invalid.
    CheckConfig {
        /// Rule files, or directories of *.yaml / *.yml files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Rule file, or directory of *.yaml / *.yml files; may be repeated.
    #[arg(long, env = "SLUICE_RULES", required = true, value_delimiter = ',')]
    rules: Vec<PathBuf>,

    /// Address of the gRPC listener.
    #[arg(long, env = "SLUICE_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    grpc_addr: SocketAddr,

    /// Address of the HTTP admin listener.
    #[arg(long, env = "SLUICE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,

    /// Keep buckets in a standalone Redis: `redis://[user:password@]host:port[/db]`,
    /// `rediss://…` (TLS) or `redis+unix:///path/to/socket`.
    #[arg(long, env = "SLUICE_REDIS_URL", conflicts_with_all = ["redis_sentinels", "redis_cluster_nodes"])]
    redis_url: Option<String>,

    /// Keep buckets in the master that these sentinels (`host:port`, comma-separated) name.
    #[arg(
        long,
        env = "SLUICE_REDIS_SENTINELS",
        value_delimiter = ',',
        requires = "redis_sentinel_master"
    )]
    redis_sentinels: Vec<String>,

    /// The master name the sentinels know.
    #[arg(long, env = "SLUICE_REDIS_SENTINEL_MASTER")]
    redis_sentinel_master: Option<String>,

    /// Keep buckets in a Redis Cluster reached through these seed nodes (`host:port`, commas).
    #[arg(
        long,
        env = "SLUICE_REDIS_CLUSTER_NODES",
        value_delimiter = ',',
        conflicts_with = "redis_sentinels"
    )]
    redis_cluster_nodes: Vec<String>,

    /// A file holding the Redis password (for a password kept out of argv and the environment).
    #[arg(long, env = "SLUICE_REDIS_PASSWORD_FILE")]
    redis_password_file: Option<PathBuf>,

    /// PEM file of the certificate authority of a `rediss://` server, when the system does not
    /// trust it already.
    #[arg(long, env = "SLUICE_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,

    /// Deadline of one Redis call, e.g. `10ms`.
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT", default_value = "10ms", value_parser = parse_duration)]
    redis_timeout: Duration,

    /// `first-entry`: a Redis Cluster hash tag from the domain and a descriptor's first entry,
    /// so that all buckets of one identity share a slot; `none`: no tag.
    #[arg(long, env = "SLUICE_REDIS_HASH_TAG", default_value = "none", value_parser = parse_hash_tag)]
    redis_hash_tag: HashTag,

    /// While Redis cannot decide: `fallback` (in-process buckets), `allow` (everything
    /// passes) or `deny` (decisions fail with UNAVAILABLE).
    #[arg(long, env = "SLUICE_FAILURE_MODE", default_value = "fallback", value_parser = parse_failure_mode)]
    failure_mode: FailureMode,

    /// Share of each limit the in-process fallback grants, e.g. 0.25 for 4 instances.
    #[arg(long, env = "SLUICE_FALLBACK_SHARE", default_value_t = 1.0)]
    fallback_share: f64,

    /// While Redis is failing, how often one decision probes it, e.g. `1s`.
    #[arg(long, env = "SLUICE_FALLBACK_PROBE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    fallback_probe_interval: Duration,

    /// Connections to a standalone or Sentinel Redis, each carrying batches of decisions.
    #[arg(long, env = "SLUICE_REDIS_CONNECTIONS", default_value_t = 2)]
    redis_connections: usize,

    /// Most descriptors one request may carry.
    #[arg(long, env = "SLUICE_MAX_DESCRIPTORS", default_value_t = Bounds::default().max_descriptors)]
    max_descriptors: usize,

    /// Most entries one descriptor may carry.
    #[arg(long, env = "SLUICE_MAX_ENTRIES", default_value_t = Bounds::default().max_entries)]
    max_entries: usize,

    /// Most bytes in a domain or an entry key.
    #[arg(long, env = "SLUICE_MAX_NAME_BYTES", default_value_t = Bounds::default().max_name_bytes)]
    max_name_bytes: usize,

    /// Most bytes in an entry value.
    #[arg(long, env = "SLUICE_MAX_VALUE_BYTES", default_value_t = Bounds::default().max_value_bytes)]
    max_value_bytes: usize,

    /// How often to look for changed rule files, e.g. `1s`; `0s` turns watching off (SIGHUP
    /// still reloads).
    #[arg(long, env = "SLUICE_RULES_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    rules_poll_interval: Duration,

    /// On SIGTERM or SIGINT, how long to keep answering with health failing before closing
    /// the listeners, so that balancers stop sending first, e.g. `5s`.
    #[arg(long, env = "SLUICE_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    shutdown_delay: Duration,

    /// On SIGTERM or SIGINT, how long calls in flight may take to finish, e.g. `10s`, `500ms`.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,

    /// `RateLimit` headers of the most constrained limit on every answer: `off`, `draft03`
    /// (RateLimit-Limit/Remaining/Reset) or `ietf` (RateLimit-Policy and RateLimit).
    #[arg(long, env = "SLUICE_RESPONSE_HEADERS", default_value = "off", value_parser = parse_header_style)]
    response_headers: HeaderStyle,

    /// A hit counts as near the limit when at least this share of its bucket is used.
    #[arg(long, env = "SLUICE_NEAR_LIMIT_RATIO", default_value_t = 0.8)]
    near_limit_ratio: f64,

    /// Export decision spans to this OTLP collector (gRPC), e.g. `http://127.0.0.1:4317`;
    /// needs a build with the `otlp` feature.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Log lines as `text` or `json` (one JSON object per line, with the span's fields).
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Threads that serve requests; default: one per core.
    #[arg(long, env = "SLUICE_WORKER_THREADS")]
    worker_threads: Option<usize>,

    /// Shards of the in-memory store (more shards, less waiting between cores).
    #[arg(long, env = "SLUICE_MEMORY_SHARDS", default_value_t = 64)]
    memory_shards: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { paths } => check_config(&paths),
        Command::Serve(args) => match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error:#}");
                eprintln!("sluice: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The Redis store the flags ask for, if any.
fn redis_settings(args: &ServeArgs) -> anyhow::Result<Option<RedisSettings>> {
    let topology = if let Some(url) = &args.redis_url {
        Topology::Standalone { url: url.clone() }
    } else if !args.redis_sentinels.is_empty() {
        let master = args.redis_sentinel_master.clone().unwrap_or_default();
        Topology::Sentinel {
            sentinels: args.redis_sentinels.clone(),
            master,
        }
    } else if !args.redis_cluster_nodes.is_empty() {
        Topology::Cluster {
            nodes: args.redis_cluster_nodes.clone(),
        }
    } else {
        return Ok(None);
    };
    let password = match &args.redis_password_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --redis-password-file {}", path.display()))?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
    };
    let tls_ca = match &args.redis_ca_file {
        None => None,
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --redis-ca-file {}", path.display()))?,
        ),
    };
    Ok(Some(RedisSettings {
        topology,
        password,
        tls_ca,
        timeout: args.redis_timeout,
        connections: args.redis_connections,
    }))
}

fn parse_header_style(text: &str) -> Result<HeaderStyle, String> {
    match text {
        "off" => Ok(HeaderStyle::Off),
        "draft03" => Ok(HeaderStyle::Draft03),
        "ietf" => Ok(HeaderStyle::Ietf),
        _ => Err(format!(
            "`{text}` is not a header style; use off, draft03 or ietf"
        )),
    }
}

fn parse_failure_mode(text: &str) -> Result<FailureMode, String> {
    match text {
        "fallback" => Ok(FailureMode::Fallback),
        "allow" => Ok(FailureMode::Allow),
        "deny" => Ok(FailureMode::Deny),
        _ => Err(format!(
            "`{text}` is not a failure mode; use fallback, allow or deny"
        )),
    }
}

fn parse_hash_tag(text: &str) -> Result<HashTag, String> {
    match text {
        "none" => Ok(HashTag::None),
        "first-entry" => Ok(HashTag::FirstEntry),
        _ => Err(format!(
            "`{text}` is not a hash tag mode; use none or first-entry"
        )),
    }
}

/// A duration written as a whole number of `ms` or `s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.strip_suffix("ms") {
        Some(number) => (number, 1),
        None => (text.strip_suffix('s').unwrap_or(text), 1_000),
    };
    let number: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 10s or 500ms"))?;
    Ok(Duration::from_millis(number * unit))
}

/// Sets up logging to stderr, as text or JSON, and, when asked and built in, export of the
/// decision spans to an OTLP collector. Runs inside the runtime: the exporter needs it.
fn init_logging(format: &str, otlp: Option<&str>) -> anyhow::Result<Telemetry> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if format == "json" {
        logs.json().boxed()
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    // Each layer has its own filter: the `decide` span is at debug level, so that logging at
    // info costs a decision nothing, while the exporter below takes every decision's span.
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    match otlp {
        None => {
            registry.init();
            Ok(Telemetry::default())
        }
        #[cfg(feature = "otlp")]
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .context("cannot set up the OTLP exporter")?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("sluice")
                .build();
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("sluice");
            let spans_only = tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.is_span() && metadata.target().starts_with("sluice")
            });
            registry
                .with(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(spans_only),
                )
                .init();
            Ok(Telemetry {
                provider: Some(provider),
            })
        }
        #[cfg(not(feature = "otlp"))]
        Some(_) => anyhow::bail!("--otlp-endpoint: this build has no OTLP export (feature otlp)"),
    }
}

/// What must be flushed before exit.
#[derive(Default)]
struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered.
    fn flush(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            let _ = provider.shutdown();
        }
    }
}

fn check_config(paths: &[PathBuf]) -> ExitCode {
    match rules::load_paths(paths) {
        Ok(set) => {
            print!("{}", rules::describe(&set));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("invalid rules: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let loaded = sluice::reload::fingerprint(&args.rules);
    let rules = rules::load_paths(&args.rules).context("invalid rules")?;
    let redis = redis_settings(&args)?;
    let bounds = Bounds {
        max_descriptors: args.max_descriptors,
        max_entries: args.max_entries,
        max_name_bytes: args.max_name_bytes,
        max_value_bytes: args.max_value_bytes,
    };
    let domains = rules.domains().len();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let telemetry = {
        let _inside = runtime.enter();
        init_logging(&args.log_format, args.otlp_endpoint.as_deref())?
    };
    let served = runtime.block_on(async move {
        let store = match redis {
            None => {
                let clock = Arc::new(MonotonicClock::new());
                Store::Memory(MemoryStore::new(args.memory_shards, clock))
            }
            Some(settings) => {
                let redis = RedisStore::connect(&settings)
                    .await
                    .context("cannot use Redis")?;
                let clock = Arc::new(MonotonicClock::new());
                let fallback = MemoryStore::new(args.memory_shards, clock);
                Store::Guarded(Box::new(Guarded::new(
                    redis,
                    fallback,
                    args.failure_mode,
                    args.fallback_share,
                    args.fallback_probe_interval,
                )))
            }
        };
        let limiter = Arc::new(
            Limiter::new(rules, store, bounds)
                .with_hash_tag(args.redis_hash_tag)
                .with_near_limit_ratio(args.near_limit_ratio)
                .with_response_headers(args.response_headers),
        );
        let addresses = Addresses {
            grpc: args.grpc_addr,
            http: args.http_addr,
        };
        let server = Server::start(limiter.clone(), addresses).await?;
        tracing::info!(
            grpc = %server.grpc_addr(),
            http = %server.http_addr(),
            store = %limiter.store().name(),
            domains,
            "listening"
        );
        let (stop_watching, stopped) = tokio::sync::watch::channel(false);
        if !args.rules_poll_interval.is_zero() {
            let watcher = sluice::reload::watch_files(
                limiter.clone(),
                args.rules.clone(),
                loaded,
                args.rules_poll_interval,
                stopped,
            );
            tokio::spawn(watcher);
        }
        wait_for_shutdown(&limiter, &args.rules).await?;
        let _ = stop_watching.send(true);
        tracing::info!("shutting down");
        server.drain();
        tokio::time::sleep(args.shutdown_delay).await;
        server.shutdown(args.shutdown_grace).await;
        Ok(())
    });
    {
        let _inside = runtime.enter();
        telemetry.flush();
    }
    served
}

/// Waits for SIGTERM or SIGINT, reloading the rules on every SIGHUP meanwhile.
async fn wait_for_shutdown(limiter: &Limiter, rules: &[PathBuf]) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the rules");
                let _ = sluice::reload::reload(limiter, rules);
            }
        }
    }
}
