//! The Kubernetes API client.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// A client like `kube::Client::try_from(config)` (the same TLS, auth,
/// headers, timeouts and retries of 429/503/504), except that its
/// connections send each request at once (TCP_NODELAY), as client-go's do.
///
/// kube leaves Nagle's algorithm on (kube-rs/kube#2056): the first request
/// with a body on a new connection then waits for the API server's delayed
/// ACK, 40 ms on Linux. The controllers open a connection whenever more
/// requests run at once than are pooled, and after each idle period; the
/// fork benchmark (`sandfork-e2e-bench`) saw a status write take 50 ms
/// instead of 5 that way. Drop this once kube can set it.
pub fn new(config: kube::Config) -> kube::Result<kube::Client> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}
