//! # qoe-tls
//!
//! TLS wherever the project speaks it, on rustls: [`ServerTls`] on the router's own port
//! (module [`server`]), and [`ClientTls`] for every connection the project makes to an `https`
//! server: the router toward endpoints (vLLM's `--ssl-certfile` and `--ssl-keyfile`, or an
//! engine behind a TLS-terminating proxy) and the live benchmark toward its targets.
//!
//! One rustls client configuration per process, built at start: it trusts the public web roots
//! compiled in (Mozilla's, from `webpki-roots`, so the binary needs no CA bundle on the machine)
//! plus every certificate of a PEM file the operator names (a private CA, or the machine's
//! bundle), verifies the server's certificate against the URL's host name or IP address, and
//! speaks HTTP/1.1 only. Cryptography is aws-lc-rs' (rustls' default provider, with
//! post-quantum hybrid key exchange), passed explicitly, so no process-wide default needs
//! installing.

pub mod server;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use server::ServerTls;

pub use hyper_rustls::HttpsConnector;

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// The client side of TLS: shared, cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    /// Without ALPN: hyper-rustls' connector sets its own.
    config: Arc<ClientConfig>,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the built-in web roots and, if given, every certificate in the PEM file `ca_file`
    /// (given as the option `option`, which errors name).
    pub fn new(ca_file: Option<&Path>, option: &str) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let shown = path.display();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("{option} {shown}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("{option} {shown}: {e}"))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "{option} {shown}: no certificate in it (expected PEM blocks \
                 '-----BEGIN CERTIFICATE-----')"
            );
            let (added, ignored) = roots.add_parsable_certificates(certs);
            anyhow::ensure!(
                ignored == 0,
                "{option} {shown}: {ignored} of {} certificates could not be read \
                 (not X.509 DER inside the PEM blocks)",
                added + ignored
            );
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS client configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut pooled = config.clone();
        pooled.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(pooled)),
            config: Arc::new(config),
        })
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
            .map_err(|e| format!("TLS handshake with {host}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_must_hold_ca_certificates() {
        let dir = std::env::temp_dir().join(format!("qoe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(ClientTls::new(None, "--ca").is_ok());

        let missing = dir.join("missing.pem");
        let e = ClientTls::new(Some(&missing), "--ca")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ca ") && e.contains("missing.pem"), "{e}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = ClientTls::new(Some(&empty), "--ca")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no certificate"), "{e}");

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = ClientTls::new(Some(&garbage), "--ca")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 of 1 certificates could not be read"), "{e}");

        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert!(ClientTls::new(Some(&good), "--ca").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
