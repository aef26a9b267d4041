//! The listeners: gRPC (Envoy's RLS v3) and the HTTP admin API, and their lifecycle.
//!
//! [`Server::start`] binds both listeners before anything is served, so a taken address is an
//! error at start rather than a log line later, then serves until [`Server::shutdown`]. This is
//! also where a failed decision gets its gRPC status, chosen once for every caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::proto::{RateLimitRequest, RateLimitResponse, RateLimitService, RateLimitServiceServer};
use crate::service::{DecideError, Limiter};

/// Where to listen.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The HTTP admin listener.
    pub http: SocketAddr,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address (taken, or not ours).
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// The reflection service could not read the protos' descriptors.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(String),
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// Set when shutdown begins: health answers 500 and NOT_SERVING from then on.
    draining: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds both listeners and starts serving decisions from `limiter`.
    pub async fn start(limiter: Arc<Limiter>, addresses: Addresses) -> Result<Server, StartError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        crate::telemetry::prometheus();
        crate::telemetry::rules_in_force(limiter.rules().hash(), None);
        let grpc = bind("gRPC", addresses.grpc).await?;
        let http = bind("HTTP", addresses.http).await?;
        let local = |listener: &TcpListener, what, addr| {
            listener
                .local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let grpc_addr = local(&grpc, "gRPC", addresses.grpc)?;
        let http_addr = local(&http, "HTTP", addresses.http)?;

        let (stop, stopped) = watch::channel(false);
        let (draining, drained) = watch::channel(false);
        let mut tasks = Vec::new();

        let service = RateLimitServiceServer::new(GrpcService {
            limiter: limiter.clone(),
        });
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<RateLimitServiceServer<GrpcService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|error| StartError::Reflection(error.to_string()))?;
        // Health says NOT_SERVING as soon as shutdown begins, for the balancers to move away.
        let mut going_down = drained.clone();
        tokio::spawn(async move {
            let _ = going_down.wait_for(|stop| *stop).await;
            health_reporter
                .set_not_serving::<RateLimitServiceServer<GrpcService>>()
                .await;
        });
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        let signal = wait_for_stop(stopped.clone());
        tasks.push(tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(health)
                .add_service(reflection)
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "gRPC listener failed");
            }
        }));

        let health = limiter.clone();
        let health_stopped = drained.clone();
        let config = limiter.clone();
        let admin = Router::new()
            .route(
                "/healthcheck",
                get(move || healthcheck(health.clone(), health_stopped.clone())),
            )
            .route("/metrics", get(render_metrics))
            .route("/rlconfig", get(move || rlconfig(config.clone())))
            .route(
                "/json",
                axum::routing::post(decide_json).with_state(limiter.clone()),
            );
        let signal = wait_for_stop(stopped.clone());
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(http, admin)
                .with_graceful_shutdown(signal)
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP listener failed");
            }
        }));

        if limiter.store().memory().is_some() {
            tasks.push(tokio::spawn(sweep_memory(limiter, stopped)));
        }

        Ok(Server {
            grpc_addr,
            http_addr,
            stop,
            draining,
            tasks,
        })
    }

    /// Begins shutdown without closing anything: `/healthcheck` answers 500 and gRPC health
    /// NOT_SERVING, so that balancers move away while calls are still answered.
    pub fn drain(&self) {
        let _ = self.draining.send(true);
    }

    /// The address the gRPC listener is bound to.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the HTTP listener is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops accepting, lets calls in flight finish, and returns when all listeners are closed,
    /// or once `grace` has passed: connections still open then (a client that does not answer
    /// the HTTP/2 goodbye, say) are dropped.
    pub async fn shutdown(self, grace: Duration) {
        self.drain();
        // Receivers live in the tasks; if they are all gone there is nothing left to stop.
        let _ = self.stop.send(true);
        let aborts: Vec<_> = self.tasks.iter().map(JoinHandle::abort_handle).collect();
        let drained = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis(),
                "connections still open; closing them"
            );
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Drops full buckets of the memory store once a second, so memory follows the active keys.
async fn sweep_memory(limiter: Arc<Limiter>, mut stopped: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                if let Some(memory) = limiter.store().memory() {
                    memory.sweep();
                }
            }
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

/// `POST /json`: a decision for the proto3 JSON form of a `RateLimitRequest`.
///
/// 200 with the response when the request may pass, 429 when it is over the limit, 400 with
/// a message when the JSON or the request is wrong, 503 when the store cannot decide.
async fn decide_json(
    axum::extract::State(limiter): axum::extract::State<Arc<Limiter>>,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    use axum::http::StatusCode;
    let failure =
        |status, message: String| (status, axum::Json(serde_json::json!({ "error": message })));
    let request = match crate::json::request_from_json(&body) {
        Ok(request) => request,
        Err(message) => return failure(StatusCode::BAD_REQUEST, message),
    };
    match limiter.decide(&request).await {
        Ok(response) => {
            let over = response.overall_code == crate::proto::Code::OverLimit as i32;
            let status = if over {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            (status, axum::Json(crate::json::response_to_json(&response)))
        }
        Err(DecideError::Invalid(message)) => failure(StatusCode::BAD_REQUEST, message),
        Err(DecideError::Store(error)) => {
            failure(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
    }
}

/// The rules in force, one line per rule, as `sluice check-config` prints them.
async fn rlconfig(limiter: Arc<Limiter>) -> String {
    crate::rules::describe(&limiter.rules())
}

/// The metrics in Prometheus's text format.
async fn render_metrics() -> String {
    crate::telemetry::prometheus()
        .map(|handle| handle.render())
        .unwrap_or_default()
}

/// 200 while serving, 500 once shutdown has begun; the JSON body says where decisions are made
/// and which rules are in force.
async fn healthcheck(
    limiter: Arc<Limiter>,
    stopped: watch::Receiver<bool>,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let stopping = *stopped.borrow();
    let rules = limiter.rules();
    let body = serde_json::json!({
        "status": if stopping { "shutting_down" } else { "serving" },
        "store": limiter.store().name(),
        "redis_breaker": limiter.store().breaker().map(|state| state.name()),
        "rules": {
            "domains": rules.domains().len(),
            "hash": rules.hash(),
            "last_reload_error": limiter.rules_error().as_deref(),
        },
    });
    let status = if stopping {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR
    } else {
        axum::http::StatusCode::OK
    };
    (status, axum::Json(body))
}

struct GrpcService {
    limiter: Arc<Limiter>,
}

#[tonic::async_trait]
impl RateLimitService for GrpcService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        match self.limiter.decide(request.get_ref()).await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => Err(status_of(&error)),
        }
    }
}

/// The gRPC status of a failed decision.
///
/// - A wrong request is `INVALID_ARGUMENT`: the caller must change it, retrying cannot help.
/// - A store failure is `UNAVAILABLE`: transient by definition, and the status Envoy's filter
///   treats as an error, so it applies its `failure_mode_deny` setting (fail open by default).
pub fn status_of(error: &DecideError) -> Status {
    match error {
        DecideError::Invalid(message) => Status::invalid_argument(message.clone()),
        DecideError::Store(store) => Status::unavailable(store.to_string()),
    }
}
