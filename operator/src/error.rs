//! The operator's errors, and which of them are worth retrying.
//!
//! A reconcile returns `Err` only for what may go away by itself (the API
//! server or an agent unreachable, a conflict, a timeout): the controller
//! retries those with a growing backoff. What will not go away (a bad spec, a
//! source that failed) is written into the object's conditions instead and
//! the reconcile returns `Ok(Action::await_change())`; [`Error::Permanent`]
//! is for the few such cases found where no status can be written.

use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed")]
    Kube(#[from] kube::Error),

    /// Adding or removing the finalizer failed.
    #[error("could not {action} the finalizer")]
    Finalizer {
        action: &'static str,
        #[source]
        source: kube::Error,
    },

    #[error("agent on node {node}")]
    Agent {
        node: String,
        #[source]
        status: tonic::Status,
    },

    #[error("cannot reach the agent on node {node}")]
    Dial {
        node: String,
        #[source]
        source: tonic::transport::Error,
    },

    #[error("the agent on node {node} is not available: {reason}")]
    AgentUnavailable { node: String, reason: String },

    /// Cleanup is waiting for something to finish (the finalizer is
    /// removed after any successful cleanup, so waiting is an error that is
    /// retried).
    #[error("waiting: {0}")]
    Waiting(String),

    #[error("the reconcile took longer than {0:?}")]
    Timeout(std::time::Duration),

    #[error("{0}")]
    Permanent(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the operator process could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading {}", path.display())]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("finding the Kubernetes client configuration")]
    KubeConfig(#[from] kube::config::InferConfigError),

    #[error("Kubernetes API request failed")]
    Kube(#[from] kube::Error),

    #[error("serving HTTP on {addr}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("the HTTP endpoint stopped")]
    HttpStopped(#[source] Option<tokio::task::JoinError>),

    #[error("the watch of the agent Leases stopped before it had read them")]
    LeaseWatch(#[from] kube::runtime::reflector::store::WriterDropped),

    #[error("lost the leader Lease")]
    LostLeadership,
}

/// Formats an error with its sources, `outer: inner: innermost`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

impl Error {
    /// The agent on `node` answered `status`.
    pub fn agent(node: &str, status: tonic::Status) -> Self {
        Error::Agent {
            node: node.to_string(),
            status,
        }
    }

    /// Whether retrying the same reconcile later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube(err) | Error::Finalizer { source: err, .. } => kube_is_transient(err),
            Error::Agent { status, .. } => agent_code_is_transient(status.code()),
            Error::Dial { .. }
            | Error::AgentUnavailable { .. }
            | Error::Waiting(_)
            | Error::Timeout(_) => true,
            Error::Permanent(_) => false,
        }
    }

    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer { .. } => "finalizer",
            Error::Agent { .. } => "agent",
            Error::Dial { .. } => "dial",
            Error::AgentUnavailable { .. } => "agent_unavailable",
            Error::Waiting(_) => "waiting",
            Error::Timeout(_) => "timeout",
            Error::Permanent(_) => "permanent",
        }
    }

    /// Whether this is only [`Error::Waiting`], not worth a warning.
    pub fn is_waiting(&self) -> bool {
        matches!(self, Error::Waiting(_))
    }

    /// Whether the API server refused a write made from a stale copy (409).
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Kube(err) | Error::Finalizer { source: err, .. } => {
                matches!(err, kube::Error::Api(status) if status.code == 409)
            }
            _ => false,
        }
    }

    /// The gRPC status, when the error came from an agent.
    pub fn agent_code(&self) -> Option<Code> {
        match self {
            Error::Agent { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Codes that say the request itself is wrong and will fail again.
pub fn agent_code_is_transient(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

fn kube_is_transient(err: &kube::Error) -> bool {
    match err {
        // 4xx other than conflicts, throttling and timeouts will not change on retry.
        kube::Error::Api(status) => {
            let code = status.code;
            code == 409 || code == 429 || code == 408 || code >= 500
        }
        _ => true,
    }
}

/// Whether `err` is the API server's 404.
pub fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

/// Whether `err` is the API server's 409 for a create of an existing name.
pub fn is_already_exists(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409 && status.reason == "AlreadyExists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_once_with_their_sources() {
        let conflict = kube::Error::Api(Box::new(
            kube::core::Status::failure("the object has been modified", "Conflict").with_code(409),
        ));
        let err = Error::Finalizer {
            action: "add",
            source: conflict,
        };
        assert!(err.is_conflict());
        let chain = ErrorChain(&err).to_string();
        assert!(
            chain.starts_with("could not add the finalizer: "),
            "{chain}"
        );

        let agent = Error::agent("node-a", tonic::Status::unavailable("agent restarting"));
        let chain = ErrorChain(&agent).to_string();
        assert!(chain.starts_with("agent on node node-a: "), "{chain}");
        assert_eq!(chain.matches("agent restarting").count(), 1, "{chain}");
    }
}
