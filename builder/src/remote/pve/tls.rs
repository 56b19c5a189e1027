//! TLS trust for the PVE API: a pinned SHA-256 fingerprint of the node's certificate, a CA file
//! (the cluster's `pve-root-ca.pem`), or an explicit `--insecure` that warns on every run.
//!
//! Nothing here ever skips verification silently: the pin verifier still checks the handshake
//! signatures with the provider's algorithms, and the insecure one says so on stderr each time.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Parses `AB:CD:…` (32 byte pairs, any case) or 64 hex digits; an `sha256` prefix (as
    /// `openssl x509 -fingerprint` prints it) is allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let t = t
            .split_once('=')
            .filter(|(k, _)| k.to_ascii_lowercase().contains("sha256"))
            .map_or(t, |(_, v)| v.trim());
        let hexed: String = t.chars().filter(|c| *c != ':').collect();
        let colons_ok = !t.contains(':') || t.split(':').all(|p| p.len() == 2);
        let mut out = [0u8; 32];
        if hexed.len() != 64 || !colons_ok || hex::decode_to_slice(&hexed, &mut out).is_err() {
            return Err(format!(
                "malformed certificate fingerprint {:?}: expected the SHA-256 fingerprint as 32 \
                 hex byte pairs like AB:CD:EF:… (see `pvenode cert info` on the node)",
                abbreviate(text)
            ));
        }
        Ok(Self(out))
    }

    /// The fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Self {
        Self(Sha256::digest(cert).into())
    }
}

fn abbreviate(s: &str) -> String {
    if s.chars().count() > 110 {
        format!("{}…", s.chars().take(100).collect::<String>())
    } else {
        s.to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        f.write_str(&parts.join(":"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// How the server certificate is trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The leaf certificate's SHA-256 must equal this.
    Pin(Fingerprint),
    /// The chain must verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// No verification of the certificate at all (`--insecure`); warns every time.
    Insecure,
}

/// What the verifiers saw, so that a failed handshake can be explained in plain words.
#[derive(Debug, Default)]
pub struct Observed {
    /// Fingerprint of the last leaf certificate the server presented.
    pub seen: Mutex<Option<Fingerprint>>,
    /// Set when the pin did not match.
    pub mismatch: Mutex<bool>,
}

impl Observed {
    /// The fingerprint that failed the pin, if the last handshake failed on it.
    pub fn pin_mismatch(&self) -> Option<Fingerprint> {
        let mismatch = *self.mismatch.lock().unwrap_or_else(|e| e.into_inner());
        if mismatch {
            *self.seen.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            None
        }
    }

    fn record(&self, fp: Fingerprint, mismatch: bool) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        *self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) = mismatch;
    }
}

/// Accepts exactly the pinned leaf certificate, or (insecure) any certificate; both still check
/// the handshake signatures.
#[derive(Debug)]
struct LeafVerifier {
    pin: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
    observed: Arc<Observed>,
}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity.as_ref());
        match self.pin {
            Some(pin) if pin != got => {
                self.observed.record(got, true);
                Err(rustls::Error::General(format!(
                    "certificate fingerprint {got} does not match the pinned {pin}"
                )))
            }
            _ => {
                self.observed.record(got, false);
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn read_ca_file(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading CA file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("CA file {}: unusable certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Builds the rustls client configuration for a trust mode. Errors are the user's input
/// (unreadable CA file), as plain text.
pub fn client_config(
    trust: &Trust,
    observed: Arc<Observed>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("configuring TLS: {e}"))?;
    let mut config = match trust {
        Trust::CaFile(path) => builder
            .with_root_certificates(read_ca_file(path)?)
            .with_no_client_auth(),
        Trust::Pin(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                pin: Some(*fp),
                provider,
                observed,
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                pin: None,
                provider,
                observed,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let colon = "AB:".repeat(31) + "AB";
        let fp = Fingerprint::parse(&colon).unwrap();
        assert_eq!(fp.0, [0xab; 32]);
        assert_eq!(fp.to_string(), colon);
        assert_eq!(Fingerprint::parse(&colon.to_lowercase()).unwrap(), fp);
        assert_eq!(Fingerprint::parse(&"ab".repeat(32)).unwrap(), fp);
        assert_eq!(
            Fingerprint::parse(&format!("sha256 Fingerprint={colon}")).unwrap(),
            fp
        );
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for bad in [
            "",
            "AB:CD",
            &"ZZ:".repeat(32),
            &"ABC:".repeat(16),
            &"AB:".repeat(33),
        ] {
            let e = Fingerprint::parse(bad).unwrap_err();
            assert!(e.contains("malformed certificate fingerprint"), "{e}");
        }
    }
}
