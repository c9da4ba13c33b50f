//! Test support (feature `test-support`): a throw-away CA, a server certificate it signed for
//! 127.0.0.1 and localhost, and a TLS terminator on 127.0.0.1 that relays to a plain-HTTP
//! server, so any test can put an `https` face on the mock or simulated engine it already has.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// A CA and a server certificate it signed for 127.0.0.1 and localhost, made at run time.
pub struct TestPki {
    /// The CA's certificate, PEM: what a client must trust.
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    /// The server's certificate then the CA's, PEM (for `--tls-cert-file`).
    chain_pem: String,
    /// The server's private key, PKCS#8 PEM (for `--tls-key-file`).
    key_pem: String,
    /// A client certificate the CA signed, then the CA's, PEM, and its key (mutual TLS).
    client_chain_pem: String,
    client_key_pem: String,
}

impl TestPki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "qoe test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params")
            .signed_by(&key, &issuer)
            .expect("server certificate");
        let client_key = rcgen::KeyPair::generate().expect("client key");
        let mut client =
            rcgen::CertificateParams::new(vec!["qoe-router".into()]).expect("client params");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .expect("client certificate");
        TestPki {
            client_chain_pem: format!("{}{}", client_cert.pem(), ca_cert.pem()),
            client_key_pem: client_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
            chain: vec![cert.der().clone(), ca_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain_pem: format!("{}{}", cert.pem(), ca_cert.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `path` (for a `--*-ca-file` option).
    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, &self.ca_pem).expect("write the CA file");
    }

    /// Writes the client certificate chain and its key (a client's identity for mutual TLS).
    pub fn write_client(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.client_chain_pem).expect("write the certificate file");
        std::fs::write(key, &self.client_key_pem).expect("write the key file");
    }

    /// Writes the server's certificate chain and private key (for `--tls-cert-file` and
    /// `--tls-key-file`).
    pub fn write_server(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.chain_pem).expect("write the certificate file");
        std::fs::write(key, &self.key_pem).expect("write the key file");
    }

    /// A TLS connection to `addr` that trusts this CA and offers the ALPN protocols `alpn` (as
    /// an HTTP/2-capable client offers `h2` first); the protocol agreed is the stream's
    /// `get_ref().1.alpn_protocol()`.
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.chain[1].clone()).expect("the CA as a root");
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::from(addr.ip());
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// Accepts TLS on an ephemeral port of 127.0.0.1 and relays each connection's bytes to
    /// `backend` (`http://host:port` or `host:port`); returns the `https://127.0.0.1:PORT` URL.
    /// A client that does not trust the certificate is dropped after its failed handshake.
    pub async fn terminator(&self, backend: &str) -> String {
        self.terminator_for(backend, false).await
    }

    /// [`TestPki::terminator`] that, with `require_clients`, accepts only clients presenting a
    /// certificate this CA signed ([`TestPki::write_client`]).
    pub async fn terminator_for(&self, backend: &str, require_clients: bool) -> String {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if require_clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.chain[1].clone()).expect("the CA as a root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("address"));
        let backend = backend.trim_start_matches("http://").to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        url
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
