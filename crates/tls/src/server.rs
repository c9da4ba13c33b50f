//! The server side: TLS on the router's own port (`--tls-cert-file`, `--tls-key-file`), for a
//! router that faces its clients directly, as vLLM does with `--ssl-certfile`.
//!
//! The certificate rotates: it is re-read when its files change ([`crate::reload`]).

use crate::reload::ReloadingPair;
use crate::PemFile;
use rustls::server::WebPkiClientVerifier;
use std::sync::Arc;
use std::time::Duration;

/// An accepted connection after its handshake.
pub type ServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// TLS for accepted connections: hands each accepted TCP stream to [`ServerTls::accept`].
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<ReloadingPair>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.resolver.cert_path())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Serves the certificate chain of the PEM file `cert` (the server's certificate first,
    /// then its intermediates) with the private key of the PEM file `key`, re-read when they
    /// change (checked at most every `reload_check`). With `client_ca`, every client must
    /// present a certificate that chains to one of its certificates (mutual TLS).
    pub fn new(
        cert: PemFile<'_>,
        key: PemFile<'_>,
        client_ca: Option<PemFile<'_>>,
        reload_check: Duration,
    ) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let resolver = Arc::new(ReloadingPair::load(
            cert,
            key,
            provider.clone(),
            reload_check,
        )?);
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS server configuration: {e}"))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(ca.roots()?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| anyhow::anyhow!("{} {}: {e}", ca.option, ca.path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        // HTTP/2 first, as a browser or an HTTP/2 client prefers it; HTTP/1.1 for the rest.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
        })
    }

    /// The TLS handshake of an accepted connection.
    pub async fn accept(&self, tcp: tokio::net::TcpStream) -> std::io::Result<ServerStream> {
        self.acceptor.accept(tcp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;
    use crate::ClientTls;
    use std::path::{Path, PathBuf};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("qoe-tls-server-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn server(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<ServerTls> {
        ServerTls::new(
            PemFile::new(cert, "--tls-cert-file"),
            PemFile::new(key, "--tls-key-file"),
            client_ca.map(|p| PemFile::new(p, "--tls-client-ca-file")),
            Duration::ZERO,
        )
    }

    /// One handshake over loopback: whether a client trusting `ca` (and presenting `identity`)
    /// and the server agree.
    async fn handshake(
        server: &ServerTls,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<(), String> {
        let identity = identity.map(|(c, k)| (PemFile::new(c, "--cert"), PemFile::new(k, "--key")));
        let client = ClientTls::new(Some(PemFile::new(ca, "--ca")), identity).unwrap();
        handshake_with(server, &client).await
    }

    async fn handshake_with(server: &ServerTls, client: &ClientTls) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            server.accept(tcp).await.map(|_| ())
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connected = client.connect("127.0.0.1", tcp).await.map(|_| ());
        // TLS 1.3 clients finish before the server has checked their certificate: the server's
        // side tells.
        let accepted = accepted.await.unwrap().map_err(|e| e.to_string());
        connected.and(accepted)
    }

    #[test]
    fn bad_pairs_are_refused_with_the_option_named() {
        let dir = temp_dir("bad");
        let (a, b) = (TestPki::new(), TestPki::new());
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let e = server(&dir.join("none.pem"), &key, None).unwrap_err();
        assert!(e.to_string().starts_with("--tls-cert-file "), "{e}");
        a.write_server(&cert, &key);
        std::fs::write(&key, "no key here\n").unwrap();
        let e = server(&cert, &key, None).unwrap_err();
        assert!(e.to_string().starts_with("--tls-key-file "), "{e}");
        // A's certificate with B's key.
        b.write_server(&dir.join("b-cert.pem"), &key);
        let e = server(&cert, &key, None).unwrap_err().to_string();
        assert!(
            e.contains("--tls-cert-file") && e.contains("--tls-key-file"),
            "{e}"
        );
        a.write_server(&cert, &key);
        assert!(server(&cert, &key, None).is_ok());
        let e = server(&cert, &key, Some(&dir.join("none.pem"))).unwrap_err();
        assert!(e.to_string().starts_with("--tls-client-ca-file "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_rotated_certificate_is_served_and_a_broken_one_is_not() {
        let dir = temp_dir("reload");
        let (a, b) = (TestPki::new(), TestPki::new());
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let (ca_a, ca_b) = (dir.join("ca-a.pem"), dir.join("ca-b.pem"));
        a.write_ca(&ca_a);
        b.write_ca(&ca_b);
        a.write_server(&cert, &key);
        let tls = server(&cert, &key, None).unwrap();
        assert_eq!(handshake(&tls, &ca_a, None).await, Ok(()));
        assert!(
            handshake(&tls, &ca_b, None).await.is_err(),
            "B's CA did not sign A"
        );

        // Rotated: B's pair from the next handshake on. (The modification time must move.)
        std::thread::sleep(Duration::from_millis(20));
        b.write_server(&cert, &key);
        assert_eq!(handshake(&tls, &ca_b, None).await, Ok(()));
        assert!(handshake(&tls, &ca_a, None).await.is_err());

        // Half-written: B stays in use.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert_eq!(handshake(&tls, &ca_b, None).await, Ok(()));
        // Written whole at last: A again.
        std::thread::sleep(Duration::from_millis(20));
        a.write_server(&cert, &key);
        assert_eq!(handshake(&tls, &ca_a, None).await, Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A's server pair and A's CA, written in `dir`: (certificate, key, CA).
    fn a_server_and_its_ca(a: &TestPki, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key, ca) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        );
        a.write_server(&cert, &key);
        a.write_ca(&ca);
        (cert, key, ca)
    }

    #[tokio::test]
    async fn with_a_client_ca_only_its_clients_get_in() {
        let dir = temp_dir("mutual");
        let (a, b) = (TestPki::new(), TestPki::new());
        let (cert, key, ca) = a_server_and_its_ca(&a, &dir);
        let (a_cert, a_key) = (dir.join("a-client.pem"), dir.join("a-client.key"));
        let (b_cert, b_key) = (dir.join("b-client.pem"), dir.join("b-client.key"));
        a.write_client(&a_cert, &a_key);
        b.write_client(&b_cert, &b_key);
        let tls = server(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(handshake(&tls, &ca, Some((&a_cert, &a_key))).await, Ok(()));
        let e = handshake(&tls, &ca, None).await.unwrap_err();
        assert!(e.contains("certificate"), "no certificate: {e}");
        assert!(handshake(&tls, &ca, Some((&b_cert, &b_key))).await.is_err());
        // Without a client CA, a client's certificate is not asked for.
        let open = server(&cert, &key, None).unwrap();
        assert_eq!(handshake(&open, &ca, None).await, Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_rotated_client_certificate_is_presented_and_a_broken_one_is_not() {
        let dir = temp_dir("client-reload");
        let (a, b) = (TestPki::new(), TestPki::new());
        let (cert, key, ca) = a_server_and_its_ca(&a, &dir);
        let (id_cert, id_key) = (dir.join("client.pem"), dir.join("client.key"));
        b.write_client(&id_cert, &id_key);
        let client = ClientTls::with_reload_check(
            Some(PemFile::new(&ca, "--ca")),
            Some((
                PemFile::new(&id_cert, "--cert"),
                PemFile::new(&id_key, "--key"),
            )),
            Duration::ZERO,
        )
        .unwrap();
        // A server of its own for every handshake: no session to resume, so each one shows
        // which certificate the client presents.
        let fresh = || server(&cert, &key, Some(&ca)).unwrap();
        assert!(
            handshake_with(&fresh(), &client).await.is_err(),
            "B's client certificate is not signed by A's CA"
        );

        // Rotated to A's pair: presented from the next handshake on.
        std::thread::sleep(Duration::from_millis(20));
        a.write_client(&id_cert, &id_key);
        assert_eq!(handshake_with(&fresh(), &client).await, Ok(()));

        // Half-written: A's stays in use.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&id_cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert_eq!(handshake_with(&fresh(), &client).await, Ok(()));

        // B's again, written whole.
        std::thread::sleep(Duration::from_millis(20));
        b.write_client(&id_cert, &id_key);
        assert!(handshake_with(&fresh(), &client).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
