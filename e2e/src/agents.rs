//! Talking to the node agents the way the operator does: find each one's
//! endpoint in its Lease, dial it over mutual TLS with the operator's client
//! certificate from the Secret the chart made.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use sandfork_api::agent::lease as keys;
use sandfork_api::agent::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// One side's certificate, key and CA (a `kubernetes.io/tls` Secret with `ca.crt`).
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl TlsFiles {
    pub async fn from_secret(
        client: &kube::Client,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Self> {
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{name}"))?;
        let data = secret.data.unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
                .ok_or_else(|| anyhow!("Secret {namespace}/{name} has no {key}"))
        };
        Ok(Self {
            ca: field("ca.crt")?,
            cert: field("tls.crt")?,
            key: field("tls.key")?,
        })
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        for (name, text) in [
            ("ca.crt", &self.ca),
            ("tls.crt", &self.cert),
            ("tls.key", &self.key),
        ] {
            let path = dir.join(name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The agents' Leases in `namespace`: node name to endpoint (`host:port`).
pub async fn endpoints(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let leases = Api::<Lease>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&keys::selector()))
        .await
        .with_context(|| format!("listing agent Leases in {namespace}"))?;
    Ok(leases
        .into_iter()
        .filter_map(|lease| {
            let labels = lease.metadata.labels?;
            let annotations = lease.metadata.annotations?;
            Some((
                labels.get(keys::NODE_LABEL)?.clone(),
                annotations.get(keys::ENDPOINT)?.clone(),
            ))
        })
        .collect())
}

/// A gRPC client of the agent at `endpoint`, authenticated with `tls`
/// (the operator's client certificate) and verifying `server_name`.
pub async fn connect(
    endpoint: &str,
    tls: &TlsFiles,
    server_name: &str,
) -> anyhow::Result<AgentClient<Channel>> {
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca))
        .identity(Identity::from_pem(&tls.cert, &tls.key))
        .domain_name(server_name);
    let channel = Endpoint::from_shared(format!("https://{endpoint}"))?
        .tls_config(config)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the agent at {endpoint}"))?;
    Ok(AgentClient::new(channel))
}
