//! The Redis store: every decision is one call of `lua/token_bucket.lua`, so any number of
//! Sluice instances sharing a Redis enforce one limit exactly.
//!
//! - **Standalone** (`redis://`, `rediss://`, `redis+unix://`): a few connections, each owned
//!   by a dispatcher task. A dispatcher sends every decision waiting for its connection in one
//!   script call (each decision still atomic and all or nothing on its own), so under load many
//!   decisions share one round trip, and when idle a decision goes out at once. No connection
//!   is checked out per decision. The connections are Sluice's own lean RESP ones
//!   ([`super::resp`]): a batch costs one write and one read, with nothing between the
//!   dispatcher and the socket; a connection that fails is dropped and opened again for the
//!   next batch.
//! - **Sentinel**: the same, on the master the sentinels name; it is asked of them again after
//!   a failed call, so a failover is followed.
//! - **Cluster**: the charges of a decision are grouped by hash slot and the groups run in
//!   parallel. A group takes its tokens when its own enforcing buckets hold them; when the
//!   request as a whole is denied, the groups that took give their tokens back with the same
//!   script, so a denied request still costs nothing.
//!
//! The script is sent with `EVALSHA`, and loaded again when Redis answers `NOSCRIPT` (after a
//! restart or a `SCRIPT FLUSH`). Every call has a deadline well inside Envoy's 20 ms; a call
//! that misses it, or a connection that fails, is a transient [`StoreError::Unavailable`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionInfo, RedisError, Script};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::resp::{self, Reply};
use super::{Charge, ChargeResult, Decision, Mode, StoreError, verdict};
use crate::bucket::Probe;
use crate::clock::Clock;
use crate::key;

/// The one script, with its contract at the top of the file.
pub const SCRIPT: &str = include_str!("../../lua/token_bucket.lua");

/// Numbers per bucket in the reply, after each decision's leading `passed`.
const REPLY_STRIDE: usize = 2;

/// Deadline for opening a connection, when the call deadline is shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Decisions sent together in one script call, at most.
const MAX_BATCH: usize = 64;

/// Decisions waiting for one connection, at most; past that, callers wait to queue.
const LANE_DEPTH: usize = 1_024;

/// Where Redis is and how to talk to it.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// The deployment.
    pub topology: Topology,
    /// Password for the Redis nodes (not the sentinels), when not given in the URL.
    pub password: Option<String>,
    /// Deadline of one call.
    pub timeout: Duration,
    /// Connections to a standalone Redis or a Sentinel master, each carrying batches.
    pub connections: usize,
    /// PEM certificate(s) of the authority that signed a `rediss://` server's certificate,
    /// when it is not one the system trusts.
    pub tls_ca: Option<Vec<u8>>,
}

/// A Redis deployment.
#[derive(Clone, Debug)]
pub enum Topology {
    /// One server: `redis://`, `rediss://` (TLS) or `redis+unix://` URL.
    Standalone {
        /// The server's URL.
        url: String,
    },
    /// A master found through sentinels.
    Sentinel {
        /// Sentinel addresses, as `host:port` or `redis://host:port` URLs.
        sentinels: Vec<String>,
        /// The name the sentinels know the master by.
        master: String,
    },
    /// A Redis Cluster.
    Cluster {
        /// Seed nodes, as `host:port` or `redis://host:port` URLs.
        nodes: Vec<String>,
    },
}

/// Buckets in Redis.
pub struct RedisStore {
    inner: Arc<Inner>,
    /// Standalone and Sentinel: the queues of the connections' dispatchers.
    lanes: Vec<mpsc::Sender<Job>>,
    next_lane: AtomicUsize,
}

struct Inner {
    target: Target,
    script: Script,
    timeout: Duration,
    /// Time to decide at instead of Redis's own clock; only tests set it.
    clock: Option<Arc<dyn Clock>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.inner.target.name())
            .finish()
    }
}

/// One decision waiting for its connection's next script call.
struct Job {
    charges: Vec<Charge>,
    answer: oneshot::Sender<Result<Decision, StoreError>>,
}

enum Target {
    Standalone(Box<Endpoint>),
    Sentinel(Box<SentinelTarget>),
    Cluster(ClusterConnection),
}

/// One server, and how to speak to it.
struct Endpoint {
    info: ConnectionInfo,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Standalone(_) => "standalone",
            Target::Sentinel(_) => "sentinel",
            Target::Cluster(_) => "cluster",
        }
    }
}

/// The master of a Sentinel deployment, found again after a failure.
struct SentinelTarget {
    client: Mutex<SentinelClient>,
    master: arc_swap::ArcSwapOption<ConnectionInfo>,
}

impl SentinelTarget {
    /// Where the master is, asking the sentinels when it is not known.
    async fn master(&self) -> Result<Arc<ConnectionInfo>, RedisError> {
        if let Some(master) = self.master.load_full() {
            return Ok(master);
        }
        let mut client = self.client.lock().await;
        // Another dispatcher may have found the master while this one waited.
        if let Some(master) = self.master.load_full() {
            return Ok(master);
        }
        let found = client.async_get_client().await?;
        let master = Arc::new(found.get_connection_info().clone());
        self.master.store(Some(master.clone()));
        Ok(master)
    }

    /// Forgets the master after a failed call; the next connection asks the sentinels again.
    fn forget(&self) {
        self.master.store(None);
    }
}

fn with_scheme(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("redis://{address}")
    }
}

async fn connect_target(settings: &RedisSettings) -> Result<Target, StoreError> {
    let target = match &settings.topology {
        Topology::Standalone { url } => {
            let mut info =
                redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(classify)?;
            if let Some(password) = &settings.password {
                let redis = info.redis_settings().clone().set_password(password);
                info = info.set_redis_settings(redis);
            }
            let tls = match info.addr() {
                redis::ConnectionAddr::TcpTls { .. } => {
                    Some(resp::tls_config(settings.tls_ca.as_deref())?)
                }
                _ => None,
            };
            Target::Standalone(Box::new(Endpoint { info, tls }))
        }
        Topology::Sentinel { sentinels, master } => {
            let mut node = redis::RedisConnectionInfo::default();
            if let Some(password) = &settings.password {
                node = node.set_password(password);
            }
            let info = SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
            let addresses: Vec<String> = sentinels.iter().map(|s| with_scheme(s)).collect();
            let client = SentinelClient::build(
                addresses,
                master.clone(),
                Some(info),
                SentinelServerType::Master,
            )
            .map_err(classify)?;
            let target = SentinelTarget {
                client: Mutex::new(client),
                master: arc_swap::ArcSwapOption::empty(),
            };
            Target::Sentinel(Box::new(target))
        }
        Topology::Cluster { nodes } => {
            let nodes: Vec<String> = nodes.iter().map(|n| with_scheme(n)).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(Duration::from_secs(1))
                .retries(3);
            if let Some(password) = &settings.password {
                builder = builder.password(password);
            }
            let client = builder.build().map_err(classify)?;
            Target::Cluster(client.get_async_connection().await.map_err(classify)?)
        }
    };
    Ok(target)
}

impl RedisStore {
    /// Connects to Redis as `settings` say; fails when it cannot reach it now.
    pub async fn connect(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        RedisStore::connect_with_clock(settings, None).await
    }

    /// Connects, deciding at the time of `clock` (when given) instead of Redis's `TIME`, so
    /// that tests can move time.
    pub async fn connect_with_clock(
        settings: &RedisSettings,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<RedisStore, StoreError> {
        // rustls needs a process-wide crypto provider for `rediss://`; installing it twice is
        // harmless, so the error of a second install is ignored.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let target = connect_target(settings).await?;
        let lanes = match &target {
            Target::Standalone(_) | Target::Sentinel(_) => settings.connections.max(1),
            Target::Cluster(_) => 0,
        };
        // A first, empty call loads the script and proves that Redis accepts us (a wrong
        // password, a certificate it does not trust) before the service says it is serving.
        // It may take longer than a decision: a connection may still be settling.
        let mut inner = Inner {
            target,
            script: Script::new(SCRIPT),
            timeout: settings.timeout.max(Duration::from_secs(2)),
            clock,
        };
        match &inner.target {
            Target::Cluster(connection) => {
                let mut connection = connection.clone();
                inner
                    .call_on(&mut connection, &[], Op::Decide, |mode| mode)
                    .await?;
            }
            Target::Standalone(_) | Target::Sentinel(_) => {
                inner.call_lane(&mut None, &[]).await?;
            }
        }
        inner.timeout = settings.timeout;
        let inner = Arc::new(inner);
        let lanes = (0..lanes)
            .map(|_| {
                let (send, receive) = mpsc::channel(LANE_DEPTH);
                tokio::spawn(dispatch(inner.clone(), receive));
                send
            })
            .collect();
        Ok(RedisStore {
            inner,
            lanes,
            next_lane: AtomicUsize::new(0),
        })
    }

    /// The deployment's kind: `standalone`, `sentinel` or `cluster`.
    pub fn topology(&self) -> &'static str {
        self.inner.target.name()
    }

    /// Applies one decision's charges atomically; see the [module doc](self).
    pub async fn charge(&self, charges: &[Charge]) -> Result<Decision, StoreError> {
        if charges.is_empty() {
            return Ok(Decision {
                passed: true,
                results: Vec::new(),
            });
        }
        if let Target::Cluster(connection) = &self.inner.target {
            return self.inner.charge_cluster(connection, charges).await;
        }
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let (answer, answered) = oneshot::channel();
        let job = Job {
            charges: charges.to_vec(),
            answer,
        };
        let queued = async {
            self.lanes[lane].send(job).await.map_err(|_| stopped())?;
            answered.await.map_err(|_| stopped())?
        };
        match tokio::time::timeout(self.inner.timeout, queued).await {
            Ok(decision) => decision,
            Err(_) => Err(self.inner.late()),
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Failed("the Redis dispatcher has stopped".to_owned())
}

/// Feeds one connection: takes every decision waiting (up to [`MAX_BATCH`]), sends them in one
/// script call, and answers each. The connection is opened on the first batch, and again on
/// the batch after one that failed.
async fn dispatch(inner: Arc<Inner>, mut jobs: mpsc::Receiver<Job>) {
    let mut connection = None;
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = jobs.recv().await {
        batch.push(job);
        // Let the callers that are ready to run queue their decisions first: the batch grows,
        // and Redis and this process do fewer calls for the same decisions.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A caller that gave up no longer needs its decision.
        batch.retain(|job| !job.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let decisions: Vec<Vec<&Charge>> = batch
            .iter()
            .map(|job| job.charges.iter().collect())
            .collect();
        let answers = match inner.call_lane(&mut connection, &decisions).await {
            Ok(reply) => decode(&decisions, &reply),
            Err(error) => Err(error),
        };
        drop(decisions);
        match answers {
            Ok(answers) => {
                for (job, answer) in batch.drain(..).zip(answers) {
                    let _ = job.answer.send(Ok(answer));
                }
            }
            Err(error) => {
                for job in batch.drain(..) {
                    let _ = job.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

impl Inner {
    fn late(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "Redis did not answer within {} ms",
            self.timeout.as_millis()
        ))
    }

    /// One script call with `decisions` on a dispatcher's `connection`, opening it if needed;
    /// a connection that failed, or whose reply is late, is dropped, and a Sentinel master is
    /// asked for again.
    ///
    /// Opening a connection (TCP, TLS, AUTH, and asking the sentinels) has a deadline of its
    /// own, longer than a call's, so that a slow handshake cannot keep a lane from ever
    /// connecting again; the callers waiting meanwhile are bounded by their own deadline.
    async fn call_lane(
        &self,
        connection: &mut Option<resp::Connection>,
        decisions: &[Vec<&Charge>],
    ) -> Result<Vec<i64>, StoreError> {
        let answer = match self.ready(connection).await {
            Ok(open) => match tokio::time::timeout(self.timeout, self.run(open, decisions)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(broken)) => {
                    // A broken stream or an unreadable reply: the connection cannot be trusted.
                    *connection = None;
                    Err(broken)
                }
                Err(_) => Err(self.late()),
            },
            Err(error) => Err(error),
        };
        if matches!(answer, Err(StoreError::Unavailable(_))) {
            // Late, lost or refused by a server that is no master now.
            *connection = None;
            if let Target::Sentinel(sentinel) = &self.target {
                sentinel.forget();
            }
        }
        answer
    }

    /// The dispatcher's connection, opened again when there is none or it went stale while
    /// idle (closed by Redis, a proxy, or a Sentinel failover that killed the old master's
    /// clients).
    async fn ready<'c>(
        &self,
        connection: &'c mut Option<resp::Connection>,
    ) -> Result<&'c mut resp::Connection, StoreError> {
        let mut kept = connection.take();
        if kept.as_mut().is_some_and(resp::Connection::is_stale) {
            kept = None;
            if let Target::Sentinel(sentinel) = &self.target {
                sentinel.forget();
            }
        }
        let open = match kept {
            Some(open) => open,
            None => {
                let deadline = self.timeout.max(CONNECT_TIMEOUT);
                tokio::time::timeout(deadline, self.open())
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "could not connect to Redis within {} ms",
                            deadline.as_millis()
                        ))
                    })??
            }
        };
        Ok(connection.insert(open))
    }

    /// Sends the script call for `decisions` on `open`, loading the script when Redis has
    /// lost it. The outer error is a broken connection (transport or unreadable reply), which
    /// must be dropped; the inner result is Redis's answer, read whole.
    async fn run(
        &self,
        open: &mut resp::Connection,
        decisions: &[Vec<&Charge>],
    ) -> Result<Result<Vec<i64>, StoreError>, StoreError> {
        let mut reply = open.call(&self.script_command(decisions, false)).await?;
        if matches!(&reply, Reply::Error(error) if error.starts_with("NOSCRIPT")) {
            // Redis restarted or its script cache was flushed: send the script itself, which
            // caches it again.
            reply = open.call(&self.script_command(decisions, true)).await?;
        }
        Ok(match reply {
            Reply::Integers(Some(numbers)) => Ok(numbers),
            Reply::Error(error) => Err(classify_reply(error)),
            other => Err(StoreError::Failed(format!(
                "unexpected reply from the script: {other:?}"
            ))),
        })
    }

    /// A new connection to the standalone server or the Sentinel master.
    async fn open(&self) -> Result<resp::Connection, StoreError> {
        match &self.target {
            Target::Standalone(endpoint) => {
                resp::Connection::open(&endpoint.info, endpoint.tls.as_ref()).await
            }
            Target::Sentinel(sentinel) => {
                let master = sentinel.master().await.map_err(classify)?;
                resp::Connection::open(&master, None).await
            }
            Target::Cluster(_) => Err(StoreError::Failed(
                "a Cluster is called through its own connection".to_owned(),
            )),
        }
    }

    /// The script call for `decisions`: `EVALSHA`, or with `body`, `EVAL` with the script
    /// itself.
    fn script_command(&self, decisions: &[Vec<&Charge>], body: bool) -> resp::Command {
        let keys: usize = decisions.iter().map(Vec::len).sum();
        let mut command = resp::Command::with_args(7 + keys);
        if body {
            command.arg(b"EVAL").arg(SCRIPT.as_bytes());
        } else {
            command
                .arg(b"EVALSHA")
                .arg(self.script.get_hash().as_bytes());
        }
        command.number(keys as u64);
        for charge in decisions.iter().flatten() {
            command.arg(&charge.key);
        }
        command
            .number(self.now())
            .number(Op::Decide as u64)
            .number(decisions.len() as u64)
            .arg(&script_numbers(decisions, |mode| mode));
        command
    }

    /// The time to decide at: 0 asks the script to read Redis's clock.
    fn now(&self) -> u64 {
        self.clock.as_ref().map_or(0, |clock| clock.now_us())
    }

    async fn charge_cluster(
        &self,
        connection: &ClusterConnection,
        charges: &[Charge],
    ) -> Result<Decision, StoreError> {
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, charge) in charges.iter().enumerate() {
            let slot = key::cluster_slot(&charge.key);
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        // Quota-mode descriptors may span groups, so no group can judge them: each group
        // enforces only its plain buckets, and the verdict over all groups is taken here.
        let local = |mode: Mode| match mode {
            Mode::Quota { .. } => Mode::Shadow,
            other => other,
        };
        let calls = groups.iter().map(|(_, members)| {
            let group: Vec<&Charge> = members.iter().map(|&i| &charges[i]).collect();
            let mut connection = connection.clone();
            async move {
                self.call_one(&mut connection, group, Op::Decide, local)
                    .await
            }
        });
        let answers = futures_util::future::join_all(calls).await;

        let mut held = vec![false; charges.len()];
        let mut results = vec![None; charges.len()];
        let mut failure = None;
        let mut took = Vec::new();
        for ((_, members), answer) in groups.iter().zip(answers) {
            match answer {
                Ok(group) => {
                    if group.passed {
                        took.push(members);
                    }
                    for (&i, result) in members.iter().zip(group.results) {
                        held[i] = result.held;
                        results[i] = Some(result);
                    }
                }
                Err(error) => failure = Some(error),
            }
        }
        let passed = failure.is_none() && verdict(charges, &held);
        if !passed {
            // Give back what the groups that passed took; their refund reports are the buckets
            // as they are without this request.
            for members in took {
                let group: Vec<&Charge> = members.iter().map(|&i| &charges[i]).collect();
                let mut connection = connection.clone();
                let refunded = self
                    .call_one(&mut connection, group, Op::Refund, local)
                    .await?;
                for (&i, result) in members.iter().zip(refunded.results) {
                    results[i] = Some(ChargeResult {
                        held: held[i],
                        report: result.report,
                    });
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        let results = results
            .into_iter()
            .map(|result| {
                result.unwrap_or(ChargeResult {
                    held: false,
                    report: None,
                })
            })
            .collect();
        Ok(Decision { passed, results })
    }

    /// One script call with one decision.
    async fn call_one(
        &self,
        connection: &mut (impl ConnectionLike + Send),
        charges: Vec<&Charge>,
        op: Op,
        mode: impl Fn(Mode) -> Mode,
    ) -> Result<Decision, StoreError> {
        let decisions = [charges];
        let reply = self.call_on(connection, &decisions, op, mode).await?;
        let malformed = || StoreError::Failed("a script reply without a decision".to_owned());
        decode(&decisions, &reply)?.pop().ok_or_else(malformed)
    }

    /// One script call with `decisions`, within the deadline.
    async fn call_on(
        &self,
        connection: &mut (impl ConnectionLike + Send),
        decisions: &[Vec<&Charge>],
        op: Op,
        mode: impl Fn(Mode) -> Mode,
    ) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for charge in decisions.iter().flatten() {
            invocation.key(charge.key.as_slice());
        }
        invocation
            .arg(self.now())
            .arg(op as u8)
            .arg(decisions.len())
            .arg(script_numbers(decisions, mode));
        let call = invocation.invoke_async::<Vec<i64>>(connection);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(reply) => reply.map_err(classify),
            Err(_) => Err(self.late()),
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Decide = 0,
    Refund = 1,
}

/// The script's `ARGV[4]`: for each decision, its count of buckets, then six numbers per
/// bucket (tick, refill per tick, units per token, capacity or 0 to deny everything, hits,
/// mode), each a little-endian double. Every number is below 2^53, so the doubles are exact.
fn script_numbers(decisions: &[Vec<&Charge>], mode: impl Fn(Mode) -> Mode) -> Vec<u8> {
    let count: usize = decisions.iter().map(|charges| 1 + 6 * charges.len()).sum();
    let mut numbers = Vec::with_capacity(8 * count);
    let mut push = |number: u64| numbers.extend_from_slice(&(number as f64).to_le_bytes());
    for charges in decisions {
        push(charges.len() as u64);
        for charge in charges {
            let [tick, refill, units, capacity] = match charge.shape {
                Some(shape) => [
                    shape.tick_us(),
                    shape.refill_per_tick(),
                    shape.units_per_token(),
                    shape.capacity(),
                ],
                None => [1, 1, 1, 0],
            };
            let mode = match mode(charge.mode) {
                Mode::Enforce => 0,
                Mode::Shadow => 1,
                Mode::Quota { group } => 2 + u64::from(group),
            };
            for number in [tick, refill, units, capacity, charge.hits, mode] {
                push(number);
            }
        }
    }
    numbers
}

/// Sorts an error reply: the ones of a server that is loading, read-only (a demoted master)
/// or busy may pass by themselves; the rest point at a defect.
fn classify_reply(error: String) -> StoreError {
    const TRANSIENT: [&str; 6] = [
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "BUSY",
        "TRYAGAIN",
        "CLUSTERDOWN",
    ];
    let code = error.split(' ').next().unwrap_or_default();
    // Before Redis 7 an error inside a script came wrapped: `ERR Error running script …
    // -READONLY You can't write against a read only replica.`
    let wrapped = || {
        error
            .split(" -")
            .skip(1)
            .any(|inner| TRANSIENT.iter().any(|code| inner.starts_with(code)))
    };
    if TRANSIENT.contains(&code) || wrapped() {
        StoreError::Unavailable(format!("Redis: {error}"))
    } else {
        StoreError::Failed(format!("Redis: {error}"))
    }
}

/// Splits a script reply into one decision per entry of `decisions`.
///
/// The script answers with the time it decided at, then each bucket's level; the reports
/// (tokens left, time until full, time until the hits are there) are worked out here with
/// the model's own arithmetic, exactly as the memory store does.
fn decode(decisions: &[Vec<&Charge>], reply: &[i64]) -> Result<Vec<Decision>, StoreError> {
    let malformed = || StoreError::Failed(format!("malformed script reply: {reply:?}"));
    let expected: usize = 1 + decisions
        .iter()
        .map(|c| 1 + REPLY_STRIDE * c.len())
        .sum::<usize>();
    if reply.len() != expected {
        return Err(malformed());
    }
    let now_us = u64::try_from(reply[0]).map_err(|_| malformed())?;
    let mut rest = &reply[1..];
    let mut out = Vec::with_capacity(decisions.len());
    for charges in decisions {
        let (this, next) = rest.split_at(1 + REPLY_STRIDE * charges.len());
        out.push(decode_one(charges, this, now_us).ok_or_else(malformed)?);
        rest = next;
    }
    Ok(out)
}

fn decode_one(charges: &[&Charge], reply: &[i64], now_us: u64) -> Option<Decision> {
    let mut results = Vec::with_capacity(charges.len());
    for (i, (charge, fields)) in charges
        .iter()
        .zip(reply[1..].chunks(REPLY_STRIDE))
        .enumerate()
    {
        let held = fields[0] == 1;
        let report = match charge.shape {
            None => None,
            Some(shape) => {
                // Charges on one bucket share the probe of its first charge, as in the
                // memory store: the tick it was brought up to is that charge's.
                let first = charges[..i]
                    .iter()
                    .filter(|other| other.key == charge.key)
                    .find_map(|other| other.shape)
                    .unwrap_or(shape);
                let probe = Probe {
                    level: 0,
                    now_tick: now_us / first.tick_us(),
                    now_us,
                };
                let level = u64::try_from(fields[1]).ok()?;
                Some(shape.report(&probe, level, charge.need()))
            }
        };
        results.push(ChargeResult { held, report });
    }
    Some(Decision {
        passed: reply[0] == 1,
        results,
    })
}

/// Sorts a Redis error: transient ones (the connection, a timeout, a failover or resharding
/// under way) may succeed if tried again or elsewhere; the rest point at a defect.
fn classify(error: RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                )
        );
    if transient {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Failed(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demoted_master_is_transient_bare_or_wrapped_in_a_script_error() {
        for reply in [
            "READONLY You can't write against a read only replica.",
            "ERR Error running script (call to f_0123): @user_script:92: @user_script: 92: \
             -READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
        ] {
            assert!(
                matches!(classify_reply(reply.to_owned()), StoreError::Unavailable(_)),
                "{reply}"
            );
        }
        for reply in [
            "ERR wrong number of arguments for 'evalsha' command",
            "ERR Error running script: -WRONGTYPE Operation against a key holding the wrong kind",
        ] {
            assert!(
                matches!(classify_reply(reply.to_owned()), StoreError::Failed(_)),
                "{reply}"
            );
        }
    }
}
