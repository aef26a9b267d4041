//! gRPC health and server reflection, so that load balancers and `grpcurl` need no protos.

mod common;

use common::{Backend, Harness};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const RLS: &str = "envoy.service.ratelimit.v3.RateLimitService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_serving_then_not_serving_on_shutdown() {
    let mut h = Harness::start(Backend::Memory, "domain: d\n").await;
    let url = format!("http://{}", h.server().grpc_addr());
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("a url")
        .connect()
        .await;
    let mut health = HealthClient::new(channel.expect("a connection"));
    let ask = || HealthCheckRequest {
        service: RLS.to_owned(),
    };
    let status = health
        .check(ask())
        .await
        .expect("an answer")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let overall = HealthCheckRequest {
        service: String::new(),
    };
    let status = health
        .check(overall)
        .await
        .expect("an answer")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    // Watch the service, then shut down: the watcher hears NOT_SERVING before the end.
    let mut watch = health.watch(ask()).await.expect("a stream").into_inner();
    let first = watch.message().await.expect("a message").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(async move { h.stop().await });
    let next = watch.message().await.expect("a message").expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop((watch, health));
    stopping.await.expect("shutdown ends");
}

/// Sends one reflection request and returns the first answer.
async fn reflect(
    reflection: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> Option<MessageResponse> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("a stream")
        .into_inner();
    let answer = answers.message().await.expect("a message");
    answer.expect("an answer").message_response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_rate_limit_service() {
    let h = Harness::start(Backend::Memory, "domain: d\n").await;
    let url = format!("http://{}", h.server().grpc_addr());
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("a url")
        .connect()
        .await;
    let mut reflection = ServerReflectionClient::new(channel.expect("a connection"));
    let answer = reflect(&mut reflection, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(services)) = answer else {
        panic!("not a list of services: {answer:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&RLS.to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    // The RLS service's file can be fetched by symbol, as grpcurl does.
    let symbol = MessageRequest::FileContainingSymbol(RLS.to_owned());
    let answer = reflect(&mut reflection, symbol).await;
    assert!(
        matches!(answer, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{answer:?}"
    );
}
