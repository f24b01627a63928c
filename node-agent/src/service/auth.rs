//! Who may call: TLS already requires a client certificate signed by the
//! configured CA; this also requires that certificate to name the operator,
//! so that another holder of a certificate from the same CA (an agent on
//! another node, say) cannot drive this agent.

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

/// An interceptor that admits only clients whose certificate carries
/// `name` as a DNS subject alternative name or as its common name.
#[derive(Clone, Debug)]
pub struct ClientName {
    name: String,
}

impl ClientName {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The names a DER certificate carries: DNS SANs, then common names.
    pub fn names_in(der: &[u8]) -> Result<Vec<String>, Status> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|err| {
            Status::unauthenticated(format!("unreadable client certificate: {err}"))
        })?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for general in &san.value.general_names {
                if let GeneralName::DNSName(dns) = general {
                    names.push(dns.to_string());
                }
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str()
                && !names.iter().any(|n| n == cn)
            {
                names.push(cn.to_string());
            }
        }
        Ok(names)
    }
}

impl tonic::service::Interceptor for ClientName {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let names = Self::names_in(leaf.as_ref())?;
        if names.contains(&self.name) {
            Ok(request)
        } else {
            Err(Status::permission_denied(format!(
                "the client certificate names {names:?}; only {:?} may call this agent",
                self.name
            )))
        }
    }
}
