//! The standard services beside the Greeter: grpc.health.v1 and server reflection v1 + v1alpha.

use std::time::Duration;

use crate::common::TestServer;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn check_reports_serving_for_the_server_and_the_greeter() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "helloworld.Greeter"] {
        let status = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }
    let status = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn watch_sees_serving_then_not_serving_on_shutdown() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut updates = health
        .watch(check("helloworld.Greeter"))
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.begin_shutdown();
    let next = tokio::time::timeout(Duration::from_secs(5), updates.message())
        .await
        .expect("an update within 5s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
}

const EXPECTED_SERVICES: [&str; 4] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "helloworld.Greeter",
];

#[tokio::test]
async fn reflection_v1_lists_and_describes_everything_served() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter([
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("helloworld.Greeter".into()),
        MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into()),
    ])
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let responses: Vec<_> = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().message_response.unwrap())
        .collect()
        .await;
    let MessageResponse::ListServicesResponse(list) = &responses[0] else {
        panic!("expected a service list, got {:?}", responses[0]);
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, EXPECTED_SERVICES);
    for response in &responses[1..] {
        assert!(
            matches!(response, MessageResponse::FileDescriptorResponse(f) if !f.file_descriptor_proto.is_empty()),
            "{response:?}"
        );
    }
}

#[tokio::test]
async fn reflection_v1alpha_lists_everything_served() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort_unstable();
    assert_eq!(names, EXPECTED_SERVICES);
}

#[tokio::test]
async fn watch_of_an_unknown_service_streams_service_unknown_and_stays_open() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut updates = health
        .watch(check("no.such.Service"))
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    let more = tokio::time::timeout(Duration::from_millis(200), updates.message()).await;
    assert!(
        more.is_err(),
        "the stream stays open, as the health protocol requires"
    );
}

#[tokio::test]
async fn reflection_describes_the_error_details_clients_decode() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "google.rpc.BadRequest".into(),
        )),
    };
    let mut responses = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );
}
