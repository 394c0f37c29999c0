//! Certificates made in the test (rcgen): a CA, server and client leaves, and the
//! files a TLS-serving cipherd reads.

use std::path::Path;

use cipherd_server::tls::TlsParams;

/// A test CA.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM, and the certificate's DER.
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

impl Ca {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf with one SAN (a URI if it contains `://`, else a DNS name), subject
    /// CN `cn`, `serial`, for server or client authentication.
    pub fn leaf(&self, san: &str, cn: &str, serial: u64, server: bool) -> Leaf {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![if san.contains("://") {
            rcgen::SanType::URI(san.try_into().expect("URI SAN"))
        } else {
            rcgen::SanType::DnsName(san.try_into().expect("DNS SAN"))
        }];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for `localhost`.
    pub fn server(&self, serial: u64) -> Leaf {
        self.leaf("localhost", &format!("cipherd-{serial}"), serial, true)
    }

    /// A client certificate whose identity is the URI SAN `spiffe`.
    pub fn client(&self, spiffe: &str) -> Leaf {
        self.leaf(spiffe, "client", 7, false)
    }
}

/// Writes `leaf` as `cert.pem` and `key.pem` into `dir`; returns TLS params.
pub fn write_leaf(dir: &Path, leaf: &Leaf) -> TlsParams {
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).expect("write cert.pem");
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).expect("write key.pem");
    TlsParams::new(dir.join("cert.pem"), dir.join("key.pem"))
}
