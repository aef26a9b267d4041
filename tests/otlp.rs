//! With the `otlp` feature, decision spans reach an OTLP collector (here a fake one, a real
//! gRPC server implementing the OTLP trace service).
#![cfg(feature = "otlp")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{descriptor, request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sluice::proto::RateLimitServiceClient;

/// Spans received: (name, attributes as key = text).
type Received = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().expect("not poisoned");
        for spans in &request.get_ref().resource_spans {
            for scope in &spans.scope_spans {
                for span in &scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let text = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                Some(Value::IntValue(n)) => n.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), text)
                        })
                        .collect();
                    received.push((span.name.clone(), attributes));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_spans_reach_an_otlp_collector() {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let collector = listener.local_addr().expect("an address");
    let service = TraceServiceServer::new(Collector(received.clone()));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );

    let dir = tempfile::tempdir().expect("a directory");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, "domain: web\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5}\n").expect("written");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--rules",
        ])
        .arg(&rules)
        .args([
            "--otlp-endpoint",
            &format!("http://{collector}"),
            "--shutdown-grace",
            "1s",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let stderr = child.stderr.take().expect("piped");
    let (lines, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let line = loop {
        let line = listening
            .recv_timeout(Duration::from_secs(20))
            .expect("a listening line");
        if line.contains("listening") {
            break line;
        }
    };
    let start = line.find("grpc=").expect("the gRPC address") + 5;
    let grpc = line[start..]
        .split_whitespace()
        .next()
        .expect("an address")
        .to_owned();
    let mut client = RateLimitServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connects");
    client
        .should_rate_limit(request("web", vec![descriptor(&[("k", "v")])]))
        .await
        .expect("a decision");
    drop(client);

    // SIGTERM flushes the spans still buffered.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert!(child.wait().expect("it exits").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let decide = received
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|(name, _)| name == "decide")
            .cloned();
        if let Some((_, attributes)) = decide {
            assert!(
                attributes.contains(&("domain".to_owned(), "web".to_owned())),
                "{attributes:?}"
            );
            assert!(
                attributes.contains(&("outcome".to_owned(), "ok".to_owned())),
                "{attributes:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no decide span reached the collector"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
