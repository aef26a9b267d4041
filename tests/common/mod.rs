//! The test harness: a real Sluice server on port 0, its gRPC client, and request builders.
#![allow(dead_code)]

pub mod http;
pub mod redis;

use std::path::PathBuf;
use std::sync::Arc;

use sluice::clock::ManualClock;
use sluice::proto::{
    Code, DescriptorStatus, Entry, RateLimitDescriptor, RateLimitOverride, RateLimitRequest,
    RateLimitResponse, RateLimitServiceClient, RateLimitUnit,
};
use sluice::rules;
use sluice::server::{Addresses, Server};
use sluice::service::{Bounds, Limiter};
use sluice::store::{MemoryStore, RedisSettings, RedisStore, Store, Topology};
use tonic::transport::Channel;

/// Where the buckets of a test server live. Every backend decides on a clock the test moves.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// The embedded in-memory store.
    Memory,
    /// A standalone `redis-server` on a unix socket.
    Redis,
    /// A Redis Cluster of three masters.
    Cluster,
    /// A master with a replica, found through three sentinels.
    Sentinel,
}

/// The Redis processes a test server uses, kept alive as long as it.
pub enum RedisProcesses {
    None,
    Standalone(redis::RedisProcess),
    Cluster(redis::RedisCluster),
    Sentinel(redis::SentinelSetup),
}

/// Starts what `backend` needs and connects a store to it, deciding on `clock`.
pub async fn store_for(backend: Backend, clock: Arc<ManualClock>) -> (Store, RedisProcesses) {
    let settings = |topology| RedisSettings {
        topology,
        password: None,
        // Generous: correctness tests must not fail on a busy machine.
        timeout: std::time::Duration::from_secs(2),
        connections: 2,
        tls_ca: None,
    };
    let redis_clock: Arc<dyn sluice::clock::Clock> = clock.clone();
    let connect = |settings: RedisSettings| async move {
        let store = RedisStore::connect_with_clock(&settings, Some(redis_clock)).await;
        Store::Redis(store.expect("Redis is reachable"))
    };
    match backend {
        Backend::Memory => (
            Store::Memory(MemoryStore::new(16, clock.clone())),
            RedisProcesses::None,
        ),
        Backend::Redis => {
            let server = redis::RedisProcess::on_socket();
            let store = connect(settings(Topology::Standalone { url: server.url() })).await;
            (store, RedisProcesses::Standalone(server))
        }
        Backend::Cluster => {
            let cluster = redis::RedisCluster::start();
            let store = connect(settings(Topology::Cluster {
                nodes: cluster.seeds(),
            }))
            .await;
            (store, RedisProcesses::Cluster(cluster))
        }
        Backend::Sentinel => {
            let setup = redis::SentinelSetup::start_serving();
            let master = redis::MASTER_NAME.to_owned();
            let topology = Topology::Sentinel {
                sentinels: setup.sentinels(),
                master,
            };
            let store = connect(settings(topology)).await;
            (store, RedisProcesses::Sentinel(setup))
        }
    }
}

/// A server started for one test, and a client connected to it.
pub struct Harness {
    pub server: Option<Server>,
    pub client: RateLimitServiceClient<Channel>,
    pub clock: Arc<ManualClock>,
    pub limiter: Arc<Limiter>,
    pub rules_dir: tempfile::TempDir,
    pub redis: RedisProcesses,
}

impl Harness {
    /// Starts a server with `rules` (one YAML file) on `backend`.
    pub async fn start(backend: Backend, rules: &str) -> Harness {
        Harness::start_with(backend, rules, Bounds::default()).await
    }

    /// Starts a server with `rules` and request `bounds`.
    pub async fn start_with(backend: Backend, rules: &str, bounds: Bounds) -> Harness {
        let rules_dir = tempfile::tempdir().expect("a temporary directory");
        let file = rules_dir.path().join("rules.yaml");
        std::fs::write(&file, rules).expect("the rules file is written");
        let rule_set = rules::load_paths(&[file]).expect("the test rules are valid");
        // Far from zero, so that nothing depends on the clock's origin.
        let clock = ManualClock::starting_at(1_000_000_000_000);
        let (store, redis) = store_for(backend, clock.clone()).await;
        let limiter = Arc::new(Limiter::new(rule_set, store, bounds));
        let loopback = "127.0.0.1:0".parse().expect("a socket address");
        let addresses = Addresses {
            grpc: loopback,
            http: loopback,
        };
        let server = Server::start(limiter.clone(), addresses)
            .await
            .expect("the server starts");
        let client = connect(&server).await;
        Harness {
            server: Some(server),
            client,
            clock,
            limiter,
            rules_dir,
            redis,
        }
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the server is running")
    }

    /// Moves the buckets' clock forward.
    pub fn advance_ms(&self, ms: u64) {
        self.clock.advance(ms * 1_000);
    }

    /// Sends a request; the call must succeed.
    pub async fn ask(&mut self, request: RateLimitRequest) -> RateLimitResponse {
        match self.call(request).await {
            Ok(response) => response,
            Err(status) => panic!("the call failed: {status:?}"),
        }
    }

    /// Sends a request.
    pub async fn call(
        &mut self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        self.client
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Asks about one descriptor of `domain`, one hit.
    pub async fn one(&mut self, domain: &str, entries: &[(&str, &str)]) -> RateLimitResponse {
        self.ask(request(domain, vec![descriptor(entries)])).await
    }

    /// Asks `times` times about one descriptor; returns how many passed.
    pub async fn passes(&mut self, domain: &str, entries: &[(&str, &str)], times: usize) -> usize {
        let mut passed = 0;
        for _ in 0..times {
            if self.one(domain, entries).await.overall_code == Code::Ok as i32 {
                passed += 1;
            }
        }
        passed
    }

    /// Stops the server.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }

    /// The directory the rules file is in.
    pub fn rules_path(&self) -> PathBuf {
        self.rules_dir.path().join("rules.yaml")
    }
}

/// A client connected to the server's gRPC listener.
pub async fn connect(server: &Server) -> RateLimitServiceClient<Channel> {
    let url = format!("http://{}", server.grpc_addr());
    RateLimitServiceClient::connect(url)
        .await
        .expect("the client connects")
}

/// A descriptor of these entries.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
    }
}

/// A descriptor with its own `hits_addend`.
pub fn descriptor_with_hits(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        ..descriptor(entries)
    }
}

/// A descriptor with a client limit override.
pub fn descriptor_with_override(
    entries: &[(&str, &str)],
    requests_per_unit: u32,
    unit: RateLimitUnit,
) -> RateLimitDescriptor {
    let limit = RateLimitOverride {
        requests_per_unit,
        unit: unit as i32,
    };
    RateLimitDescriptor {
        limit: Some(limit),
        ..descriptor(entries)
    }
}

/// A request for `domain` with these descriptors and no `hits_addend`.
pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

/// `(code, limit_remaining)` of each status.
pub fn codes(response: &RateLimitResponse) -> Vec<(Code, u32)> {
    response
        .statuses
        .iter()
        .map(|s| (code(s), s.limit_remaining))
        .collect()
}

/// The code of one status.
pub fn code(status: &DescriptorStatus) -> Code {
    Code::try_from(status.code).expect("a known code")
}

/// The overall code of a response.
pub fn overall(response: &RateLimitResponse) -> Code {
    Code::try_from(response.overall_code).expect("a known code")
}

/// The value of a response header to add, if present.
pub fn header<'a>(response: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}
