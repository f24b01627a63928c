//! Where the node agents are and how to talk to them: each agent's Lease
//! (see [`sandfork_api::agent::lease`]) says where it listens and what it can
//! hold, and is fresh while the agent lives; calls go over mutual TLS.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::Store;
use sandfork_api::agent::lease as keys;
use sandfork_api::agent::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result, RunError};

/// What an agent's Lease says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub node: String,
    /// `host:port` of its gRPC service.
    pub endpoint: String,
    pub memory_mib: u64,
    pub max_sandboxes: u32,
    pub kvm: bool,
    pub userfaultfd: bool,
    /// The last renewal.
    pub renewed: Option<Timestamp>,
    pub lease_duration: SignedDuration,
}

impl AgentRecord {
    /// Reads an agent Lease; `None` if it is not one.
    pub fn from_lease(lease: &Lease) -> Option<Self> {
        let labels = lease.metadata.labels.as_ref()?;
        if labels.get(keys::COMPONENT_LABEL).map(String::as_str) != Some(keys::COMPONENT_VALUE) {
            return None;
        }
        let node = labels.get(keys::NODE_LABEL)?.clone();
        let empty = BTreeMap::new();
        let annotations = lease.metadata.annotations.as_ref().unwrap_or(&empty);
        let get = |key: &str| annotations.get(key).map(String::as_str).unwrap_or_default();
        let spec = lease.spec.as_ref();
        Some(Self {
            node,
            endpoint: get(keys::ENDPOINT).to_string(),
            memory_mib: get(keys::MEMORY_MIB).parse().unwrap_or(0),
            max_sandboxes: get(keys::MAX_SANDBOXES).parse().unwrap_or(0),
            kvm: get(keys::KVM) == "true",
            userfaultfd: get(keys::USERFAULTFD) == "true",
            renewed: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            lease_duration: SignedDuration::from_secs(
                spec.and_then(|s| s.lease_duration_seconds)
                    .unwrap_or(0)
                    .into(),
            ),
        })
    }

    /// Whether the agent renewed its Lease within the Lease's duration.
    pub fn is_fresh(&self, now: Timestamp) -> bool {
        self.renewed
            .is_some_and(|renewed| renewed + self.lease_duration >= now)
    }

    /// Whether the agent is alive, reachable and able to run VMs.
    pub fn is_ready(&self, now: Timestamp) -> bool {
        self.is_fresh(now) && self.kvm && self.userfaultfd && !self.endpoint.is_empty()
    }

    /// Why the agent is not ready, for a condition message.
    pub fn unready_reason(&self, now: Timestamp) -> String {
        if !self.is_fresh(now) {
            match self.renewed {
                Some(renewed) => format!(
                    "its lease was last renewed at {renewed}, more than {}s ago",
                    self.lease_duration.as_secs()
                ),
                None => "its lease has never been renewed".into(),
            }
        } else if !self.kvm {
            "it reports that /dev/kvm does not work".into()
        } else if !self.userfaultfd {
            "it reports that userfaultfd does not work".into()
        } else {
            "it does not advertise an endpoint".into()
        }
    }
}

/// Opens gRPC channels to agents.
pub trait Dial: Send + Sync {
    fn channel(&self, endpoint: &str) -> Result<Channel, tonic::transport::Error>;
}

/// The agents known from their Leases, and channels to them.
#[derive(Clone)]
pub struct Agents {
    leases: Store<Lease>,
    dialer: Arc<dyn Dial>,
}

impl Agents {
    pub fn new(leases: Store<Lease>, dialer: Arc<dyn Dial>) -> Self {
        Self { leases, dialer }
    }

    /// Every agent with a Lease, fresh or not.
    pub fn all(&self) -> Vec<AgentRecord> {
        let mut agents: Vec<AgentRecord> = self
            .leases
            .state()
            .iter()
            .filter_map(|lease| AgentRecord::from_lease(lease))
            .collect();
        agents.sort_by(|a, b| a.node.cmp(&b.node));
        agents
    }

    /// The agent of `node`, if it has a Lease.
    pub fn get(&self, node: &str) -> Option<AgentRecord> {
        self.all().into_iter().find(|agent| agent.node == node)
    }

    /// A client for the agent of `node`, if that agent is ready.
    pub fn client(&self, node: &str, now: Timestamp) -> Result<AgentClient<Channel>> {
        let agent = self.get(node).ok_or_else(|| Error::AgentUnavailable {
            node: node.to_string(),
            reason: "no agent has registered for this node".into(),
        })?;
        if !agent.is_ready(now) {
            return Err(Error::AgentUnavailable {
                node: node.to_string(),
                reason: agent.unready_reason(now),
            });
        }
        let channel = self
            .dialer
            .channel(&agent.endpoint)
            .map_err(|source| Error::Dial {
                node: node.to_string(),
                source,
            })?;
        Ok(AgentClient::new(channel))
    }
}

/// Files and names for the operator's side of the mutual TLS.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentTlsArgs {
    /// CA certificate (PEM) that signed the agents' serving certificates.
    #[arg(
        long,
        env = "SANDFORK_AGENT_CA",
        default_value = "/etc/sandfork/tls/ca.crt"
    )]
    pub agent_ca: PathBuf,
    /// The operator's client certificate (PEM).
    #[arg(
        long,
        env = "SANDFORK_CLIENT_CERT",
        default_value = "/etc/sandfork/tls/tls.crt"
    )]
    pub client_cert: PathBuf,
    /// The operator's client key (PEM).
    #[arg(
        long,
        env = "SANDFORK_CLIENT_KEY",
        default_value = "/etc/sandfork/tls/tls.key"
    )]
    pub client_key: PathBuf,
    /// Name the agents' certificates must carry, whatever address is dialed.
    #[arg(long, env = "SANDFORK_AGENT_TLS_NAME", default_value = sandfork_api::agent::DEFAULT_TLS_SERVER_NAME)]
    pub agent_tls_name: String,
}

/// Dials agents over mutual TLS, keeping one channel per endpoint.
pub struct TlsDialer {
    tls: ClientTlsConfig,
    channels: Mutex<HashMap<String, Channel>>,
}

impl TlsDialer {
    pub fn from_pem(ca: &str, cert: &str, key: &str, server_name: &str) -> Self {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(server_name);
        Self {
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn from_args(args: &AgentTlsArgs) -> Result<Self, RunError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| RunError::ReadFile {
                path: path.clone(),
                source,
            })
        };
        Ok(Self::from_pem(
            &read(&args.agent_ca)?,
            &read(&args.client_cert)?,
            &read(&args.client_key)?,
            &args.agent_tls_name,
        ))
    }
}

impl Dial for TlsDialer {
    fn channel(&self, endpoint: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("channel cache lock");
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("https://{endpoint}"))?
            .tls_config(self.tls.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Dials agents in plain text; for tests only.
#[cfg(test)]
pub struct PlainDialer;

#[cfg(test)]
impl Dial for PlainDialer {
    fn channel(&self, endpoint: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(Endpoint::from_shared(format!("http://{endpoint}"))?.connect_lazy())
    }
}

/// A timeout for one call.
pub fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::agent_lease;

    #[test]
    fn reads_an_agent_lease() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let record =
            AgentRecord::from_lease(&agent_lease("node-a", "127.0.0.1:7443", 4096, now)).unwrap();
        assert_eq!(record.node, "node-a");
        assert_eq!(record.endpoint, "127.0.0.1:7443");
        assert_eq!(record.memory_mib, 4096);
        assert_eq!(record.max_sandboxes, 16);
        assert!(record.is_ready(now));
        assert!(record.is_ready(now + SignedDuration::from_secs(30)));
        let later = now + SignedDuration::from_secs(31);
        assert!(!record.is_fresh(later));
        assert!(
            record.unready_reason(later).contains("last renewed"),
            "{}",
            record.unready_reason(later)
        );
    }

    #[test]
    fn ignores_other_leases() {
        let mut other = agent_lease("node-a", "127.0.0.1:7443", 4096, Timestamp::UNIX_EPOCH);
        other.metadata.labels = None;
        assert!(AgentRecord::from_lease(&other).is_none());
    }
}
