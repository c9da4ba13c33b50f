//! # qoe-tls
//!
//! TLS wherever the project speaks it, on rustls: [`ServerTls`] on the router's own port
//! (module [`server`]), and [`ClientTls`] for every connection the project makes to an `https`
//! server: the router toward endpoints (vLLM's `--ssl-certfile` and `--ssl-keyfile`, or an
//! engine behind a TLS-terminating proxy) and the live benchmark toward its targets.
//!
//! One rustls client configuration per process, built at start: it trusts the public web roots
//! compiled in (Mozilla's, from `webpki-roots`, so the binary needs no CA bundle on the machine)
//! or, instead, every certificate of a PEM file the operator names (a private CA, or the
//! machine's bundle), verifies the server's certificate against the URL's host name or IP
//! address, and speaks HTTP/1.1 only. Cryptography is aws-lc-rs' (rustls' default provider, with
//! post-quantum hybrid key exchange), passed explicitly, so no process-wide default needs
//! installing.

pub mod reload;
pub mod server;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use reload::RELOAD_CHECK;
pub use server::ServerTls;

pub use hyper_rustls::HttpsConnector;

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The client side of TLS: shared, cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    /// Without ALPN (hyper-rustls' connector offers none when it speaks HTTP/1.1 only; the
    /// pool's connector offers `http/1.1`).
    config: Arc<ClientConfig>,
    connector: tokio_rustls::TlsConnector,
    /// Without a client certificate: whether a server asked for one.
    no_identity: Option<Arc<NoIdentity>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

/// No client certificate; remembers that a server asked for one, and says so once in the log
/// (under TLS 1.3 such a server refuses the client only after the handshake, by closing: the
/// client sees a closed connection, nothing about certificates).
#[derive(Debug, Default)]
struct NoIdentity {
    asked: AtomicBool,
}

impl rustls::client::ResolvesClientCert for NoIdentity {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        if !self.asked.swap(true, Ordering::Relaxed) {
            tracing::warn!("an https server asked for a client certificate and none is configured");
        }
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// A PEM file and the option that named it (errors say both).
#[derive(Clone, Copy, Debug)]
pub struct PemFile<'a> {
    pub path: &'a Path,
    pub option: &'a str,
}

impl<'a> PemFile<'a> {
    pub fn new(path: &'a Path, option: &'a str) -> Self {
        PemFile { path, option }
    }

    /// A certificate file and its key file, named by their options, when both are given (the
    /// options' own checks refuse one without the other).
    pub fn pair(
        cert: (Option<&'a Path>, &'a str),
        key: (Option<&'a Path>, &'a str),
    ) -> Option<(Self, Self)> {
        Some((PemFile::new(cert.0?, cert.1), PemFile::new(key.0?, key.1)))
    }

    /// Every certificate in the file, in order; an error if there is none.
    pub fn certificates(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let (option, shown) = (self.option, self.path.display());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(self.path)
            .map_err(|e| anyhow::anyhow!("{option} {shown}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{option} {shown}: {e}"))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{option} {shown}: no certificate in it (expected PEM blocks \
             '-----BEGIN CERTIFICATE-----')"
        );
        Ok(certs)
    }

    /// The file's private key.
    pub fn private_key(&self) -> anyhow::Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_file(self.path).map_err(|e| {
            anyhow::anyhow!(
                "{} {}: {e} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)",
                self.option,
                self.path.display()
            )
        })
    }

    /// The file's certificates as trust anchors. One that cannot be read is left out with a
    /// warning (a machine's bundle may hold an odd one); none readable is an error.
    pub fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(self.certificates()?);
        let (option, shown) = (self.option, self.path.display());
        anyhow::ensure!(
            added > 0,
            "{option} {shown}: {ignored} of {ignored} certificates could not be read (not X.509 \
             DER inside the PEM blocks)"
        );
        if ignored > 0 {
            tracing::warn!(
                "{option} {shown}: {ignored} of {} certificates could not be read and are left out",
                added + ignored
            );
        }
        Ok(roots)
    }
}

/// A certificate chain and its private key, checked to match.
pub fn certified_key(
    cert: PemFile<'_>,
    key: PemFile<'_>,
    provider: &rustls::crypto::CryptoProvider,
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    rustls::sign::CertifiedKey::from_der(cert.certificates()?, key.private_key()?, provider)
        .map_err(|e| {
            anyhow::anyhow!(
                "{} {} with {} {}: {e}",
                cert.option,
                cert.path.display(),
                key.option,
                key.path.display()
            )
        })
}

impl ClientTls {
    /// Trusts the certificates of `ca`, or without it the built-in web roots (as curl's
    /// `--cacert` replaces its bundle: a private CA's file pins the endpoints to that CA);
    /// presents the certificate chain and key of `identity` to servers that ask for one,
    /// re-read when the files change (checked at most every [`RELOAD_CHECK`]).
    pub fn new(
        ca: Option<PemFile<'_>>,
        identity: Option<(PemFile<'_>, PemFile<'_>)>,
    ) -> anyhow::Result<Self> {
        Self::with_reload_check(ca, identity, RELOAD_CHECK)
    }

    /// [`ClientTls::new`], with the identity's files checked for a change at most every
    /// `reload_check`.
    pub fn with_reload_check(
        ca: Option<PemFile<'_>>,
        identity: Option<(PemFile<'_>, PemFile<'_>)>,
        reload_check: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let roots = match ca {
            Some(ca) => ca.roots()?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS client configuration: {e}"))?
            .with_root_certificates(roots);
        let (config, no_identity) = match identity {
            None => {
                let none = Arc::new(NoIdentity::default());
                (builder.with_client_cert_resolver(none.clone()), Some(none))
            }
            Some((cert, key)) => {
                // Re-read when its files change (`reload`).
                let identity = Arc::new(reload::ReloadingPair::load(
                    cert,
                    key,
                    provider,
                    reload_check,
                )?);
                (builder.with_client_cert_resolver(identity), None)
            }
        };
        let mut pooled = config.clone();
        pooled.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(pooled)),
            config: Arc::new(config),
            no_identity,
        })
    }

    /// For an error message: a hint when a server has asked for a client certificate and this
    /// client has none, else "".
    pub fn identity_hint(&self) -> &'static str {
        match &self.no_identity {
            Some(n) if n.asked.load(Ordering::Relaxed) => {
                " (a server asked for a client certificate and none is configured)"
            }
            _ => "",
        }
    }

    /// hyper-util's connector `http` with TLS for `https` URLs (plain `http` ones pass as
    /// they are), speaking HTTP/1.1.
    pub fn https_or_http(&self, mut http: HttpConnector) -> HttpsConnector<HttpConnector> {
        // The scheme decides TLS; hyper-util's own check would refuse every https URL.
        http.enforce_http(false);
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.config).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    }

    /// What to add to a failed request's error (`chain`, its text) to say why TLS failed where
    /// rustls' own words do not: a server certificate that is a CA's, or, for a failure of the
    /// TLS session, a server that asked for a client certificate when none is configured.
    pub fn failure_hint(&self, chain: &str) -> &'static str {
        if chain.contains("CaUsedAsEndEntity") {
            return " (the engine's certificate is a CA certificate, which a server may not use: \
                     make a self-signed one with basicConstraints CA:FALSE, or sign it with the \
                     CA given to --upstream-ca-file)";
        }
        // Refused connections, unknown hosts and the server's own certificate are not the
        // client certificate's doing.
        let chain = chain.to_ascii_lowercase();
        if chain.contains("invalid peer certificate") {
            return "";
        }
        if ["tls", "certificate", "alert", "handshake"]
            .iter()
            .any(|word| chain.contains(word))
        {
            return self.identity_hint();
        }
        ""
    }

    /// Runs the TLS handshake over `tcp` toward `host` (a DNS name or an IP address, which the
    /// certificate must name).
    pub async fn connect(
        &self,
        host: &str,
        tcp: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("'{host}' is not a name a certificate can be checked for: {e}"))?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_hints_explain_only_what_they_are_about() {
        let tls = ClientTls::new(None, None).unwrap();
        let ca = "TLS handshake: invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))";
        assert!(tls.failure_hint(ca).contains("basicConstraints CA:FALSE"));
        assert_eq!(
            tls.failure_hint("tcp connect error: Connection refused"),
            ""
        );
        assert_eq!(
            tls.failure_hint("TLS handshake: invalid peer certificate: UnknownIssuer"),
            ""
        );
        // No server asked for a client certificate yet: nothing to say of one.
        assert_eq!(
            tls.failure_hint("TLS handshake: peer closed connection"),
            ""
        );
    }

    #[test]
    fn ca_files_must_hold_ca_certificates() {
        let dir = std::env::temp_dir().join(format!("qoe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(ClientTls::new(None, None).is_ok());

        let missing = dir.join("missing.pem");
        let e = ClientTls::new(Some(PemFile::new(&missing, "--ca")), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ca ") && e.contains("missing.pem"), "{e}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = ClientTls::new(Some(PemFile::new(&empty, "--ca")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no certificate"), "{e}");

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = ClientTls::new(Some(PemFile::new(&garbage, "--ca")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 of 1 certificates could not be read"), "{e}");

        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert!(ClientTls::new(Some(PemFile::new(&good, "--ca")), None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
