//! Sluice's load generator: drives `ShouldRateLimit` over gRPC and reports throughput and
//! latency; can also serve a do-nothing RLS server, the baseline to compare against.
//!
//! ```text
//! cargo run --release --example loadgen -- run --target 127.0.0.1:8081 --duration 10s
//! cargo run --release --example loadgen -- null-server --listen 127.0.0.1:9081
//! ```
//!
//! Every run is bounded by `--duration` and stops by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use sluice::proto::{
    Code, DescriptorStatus, Entry, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
    RateLimitService, RateLimitServiceClient, RateLimitServiceServer,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Load generator for Envoy RLS v3 servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send decisions as fast as the server answers, for a fixed time.
    Run(RunArgs),
    /// Serve an RLS server that answers OK to everything and does no work.
    NullServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9081")]
        listen: SocketAddr,
        /// Runtime worker threads (default: one per core), to compare with a Sluice run with
        /// the same `--worker-threads`.
        #[arg(long)]
        worker_threads: Option<usize>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The gRPC address of the server under test.
    #[arg(long, default_value = "127.0.0.1:8081")]
    target: SocketAddr,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The domain to ask about.
    #[arg(long, default_value = "envoy")]
    domain: String,
    /// Descriptor entries `key=value` (repeat for several entries); `{n}` in a value is
    /// replaced by a number below `--keys`, so calls spread over that many buckets.
    #[arg(long = "entry", default_value = "remote_address=10.0.{n}.1")]
    entries: Vec<String>,
    /// Descriptors per request (copies of the entries, each with its own `{n}`).
    #[arg(long, default_value_t = 1)]
    descriptors: usize,
    /// Distinct values `{n}` takes.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::NullServer {
        worker_threads: Some(threads),
        ..
    } = &cli.command
    {
        runtime.worker_threads((*threads).max(1));
    }
    runtime.build()?.block_on(execute(cli.command))
}

async fn execute(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Run(args) => run(args).await,
        Command::NullServer { listen, .. } => {
            println!("null RLS server on {listen}");
            // Configured as Sluice's own listener is, so the comparison is fair.
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let serving = tonic::transport::Server::builder()
                .add_service(RateLimitServiceServer::new(NullServer))
                .serve_with_incoming(incoming);
            tokio::spawn(serving).await??;
            Ok(())
        }
    }
}

struct NullServer;

#[tonic::async_trait]
impl RateLimitService for NullServer {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
        let statuses = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| ok.clone())
            .collect();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses,
            ..Default::default()
        }))
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    over: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let endpoint = Endpoint::from_shared(format!("http://{}", args.target))?.tcp_nodelay(true);
        channels.push(endpoint.connect().await?);
    }
    let entries: Vec<(String, String)> = args
        .entries
        .iter()
        .map(|entry| {
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect();
    let args = Arc::new(args);
    let entries = Arc::new(entries);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let client = RateLimitServiceClient::new(channels[task % channels.len()].clone());
            let (args, entries, stop) = (args.clone(), entries.clone(), stop.clone());
            tokio::spawn(drive(client, args, entries, stop, task as u64))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await?;
        total.ok += tally.ok;
        total.over += tally.over;
        total.errors += tally.errors;
        total.latencies_us.extend(tally.latencies_us);
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(&args, &mut total, elapsed);
    Ok(())
}

async fn drive(
    mut client: RateLimitServiceClient<Channel>,
    args: Arc<RunArgs>,
    entries: Arc<Vec<(String, String)>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Tally {
    let mut tally = Tally::default();
    // A small xorshift: spreads `{n}` without a dependency, the same for every run.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while !stop.load(Ordering::Relaxed) {
        let descriptors = (0..args.descriptors)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let n = (state % args.keys.max(1)).to_string();
                let entries = entries
                    .iter()
                    .map(|(key, value)| Entry {
                        key: key.clone(),
                        value: value.replace("{n}", &n),
                    })
                    .collect();
                RateLimitDescriptor {
                    entries,
                    ..Default::default()
                }
            })
            .collect();
        let request = RateLimitRequest {
            domain: args.domain.clone(),
            descriptors,
            hits_addend: 0,
        };
        let sent = Instant::now();
        let answer = client.should_rate_limit(request).await;
        let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        tally.latencies_us.push(micros);
        match answer.map(|response| response.into_inner().overall_code) {
            Ok(code) if code == Code::OverLimit as i32 => tally.over += 1,
            Ok(_) => tally.ok += 1,
            Err(_) => tally.errors += 1,
        }
    }
    tally
}

fn report(args: &RunArgs, total: &mut Tally, elapsed: f64) {
    total.latencies_us.sort_unstable();
    let calls = total.latencies_us.len();
    let percentile = |p: f64| -> f64 {
        if calls == 0 {
            return 0.0;
        }
        let index = ((calls as f64 * p).ceil() as usize).clamp(1, calls) - 1;
        f64::from(total.latencies_us[index]) / 1_000.0
    };
    println!(
        "target {} | concurrency {} over {} connections | {} descriptor(s) | {:.1} s",
        args.target, args.concurrency, args.connections, args.descriptors, elapsed
    );
    println!(
        "calls {calls}  ok {}  over_limit {}  errors {}  throughput {:.0}/s",
        total.ok,
        total.over,
        total.errors,
        calls as f64 / elapsed
    );
    println!(
        "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        percentile(0.999),
        percentile(1.0)
    );
}
