//! Throwaway certificate authorities and certificates for tests of the
//! mutual-TLS paths between the operator and the agents.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A certificate authority that signs test certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key generation");
        let cert = params.self_signed(&key).expect("self-signed CA").pem();
        Self {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// A serving certificate for the agent, valid for `dns_names` and 127.0.0.1.
    pub fn server(&self, dns_names: &[&str]) -> Pem {
        let mut sans: Vec<String> = dns_names.iter().map(|n| n.to_string()).collect();
        sans.push("127.0.0.1".into());
        self.sign(
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            dns_names.first().copied().unwrap_or("server"),
        )
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str) -> Pem {
        self.sign(
            vec![name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            name,
        )
    }

    fn sign(&self, sans: Vec<String>, usage: ExtendedKeyUsagePurpose, common_name: &str) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.subject_alt_names = sans
            .into_iter()
            .map(|san| match san.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.try_into().expect("a valid DNS name")),
            })
            .collect();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
