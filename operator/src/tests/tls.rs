//! The operator's mTLS dialer against an agent service that requires client
//! certificates: it connects with the right CA and refuses an agent whose
//! certificate another CA signed.

use std::sync::Arc;

use sandfork_api::agent::DEFAULT_TLS_SERVER_NAME;
use sandfork_api::agent::v1 as pb;
use sandfork_api::test_pki::TestCa;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::agents::{Dial, TlsDialer};
use crate::fixtures::MockAgent;

/// Serves a mock agent with `ca`'s certificate, accepting clients whose
/// certificates `server_ca_for_clients` signed; returns its address and the agent.
async fn serve_tls(ca: &TestCa, server_ca_for_clients: &TestCa) -> (String, Arc<MockAgent>) {
    let server = ca.server(&[DEFAULT_TLS_SERVER_NAME]);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.cert, &server.key))
        .client_ca_root(Certificate::from_pem(&server_ca_for_clients.cert));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Arc::new(MockAgent::default());
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(pb::agent_server::AgentServer::from_arc(agent.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr.to_string(), agent)
}

async fn get_info(dialer: &TlsDialer, endpoint: &str) -> Result<pb::AgentInfo, tonic::Status> {
    let channel = dialer.channel(endpoint).expect("endpoint parses");
    let mut client = pb::agent_client::AgentClient::new(channel);
    client
        .get_info(pb::GetInfoRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn mutual_tls_works_with_the_shared_ca() {
    let ca = TestCa::new("sandfork test CA");
    let (endpoint, agent) = serve_tls(&ca, &ca).await;
    let client = ca.client("sandfork-operator");
    let dialer = TlsDialer::from_pem(&ca.cert, &client.cert, &client.key, DEFAULT_TLS_SERVER_NAME);
    get_info(&dialer, &endpoint)
        .await
        .expect("mTLS call succeeds");
    assert_eq!(
        agent.calls(),
        vec!["GetInfo "],
        "the call reached the agent"
    );
}

#[tokio::test]
async fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let ca = TestCa::new("sandfork test CA");
    let rogue = TestCa::new("rogue CA");
    let (endpoint, agent) = serve_tls(&rogue, &ca).await;
    let client = ca.client("sandfork-operator");
    let dialer = TlsDialer::from_pem(&ca.cert, &client.cert, &client.key, DEFAULT_TLS_SERVER_NAME);
    let err = get_info(&dialer, &endpoint).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
}

#[tokio::test]
async fn an_agent_with_the_wrong_name_is_refused() {
    let ca = TestCa::new("sandfork test CA");
    let (endpoint, agent) = serve_tls(&ca, &ca).await;
    let client = ca.client("sandfork-operator");
    let dialer = TlsDialer::from_pem(&ca.cert, &client.cert, &client.key, "some-other-service");
    assert!(get_info(&dialer, &endpoint).await.is_err());
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
}

#[tokio::test]
async fn the_agent_refuses_a_client_certificate_from_another_ca() {
    let ca = TestCa::new("sandfork test CA");
    let rogue = TestCa::new("rogue CA");
    let (endpoint, agent) = serve_tls(&ca, &ca).await;
    let client = rogue.client("sandfork-operator");
    let dialer = TlsDialer::from_pem(&ca.cert, &client.cert, &client.key, DEFAULT_TLS_SERVER_NAME);
    assert!(get_info(&dialer, &endpoint).await.is_err());
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
}
