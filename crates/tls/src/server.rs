//! The server side: TLS on the router's own port (`--tls-cert-file`, `--tls-key-file`), for a
//! router that faces its clients directly, as vLLM does with `--ssl-certfile`.
//!
//! Certificates rotate (cert-manager, ACME): the files are checked for a change (modification
//! time, length, inode) at most once per [`RELOAD_CHECK`], by the handshake that finds the check
//! due and outside the lock every handshake takes, and a changed pair is loaded for the
//! handshakes after it. A pair that fails to load (a half-written file, a key that does not
//! match) keeps the previous one in use and is logged, so a botched rotation never takes the
//! router down; the router refuses to start only on a pair that is bad at start.

use crate::{certified_key, PemFile};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// An accepted connection after its handshake.
pub type ServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// How often, at most, the certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// TLS for accepted connections: hands each accepted TCP stream to [`ServerTls::accept`].
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<ReloadingCert>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.resolver.cert_path)
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
        // Seen before the load: a rotation in between is loaded at the first check.
        let seen = stamps(cert.path, key.path);
        let loaded = certified_key(cert, key, &provider)?;
        let resolver = Arc::new(ReloadingCert {
            cert_path: cert.path.to_path_buf(),
            key_path: key.path.to_path_buf(),
            options: (cert.option.to_string(), key.option.to_string()),
            provider: provider.clone(),
            reload_check,
            state: Mutex::new(Current {
                key: Arc::new(loaded),
                stamps: seen,
                checked: Instant::now(),
            }),
        });
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
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
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

/// What tells that a file changed: its modification time, length and inode.
type Stamp = (SystemTime, u64, u64);

/// The pair in use, what its files looked like when it was loaded, and when they were checked.
#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamps: Option<(Stamp, Stamp)>,
    checked: Instant,
}

#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// The options that named the two files.
    options: (String, String),
    provider: Arc<CryptoProvider>,
    reload_check: Duration,
    state: Mutex<Current>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (key, seen) = {
            let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if current.checked.elapsed() < self.reload_check {
                return Some(current.key.clone());
            }
            // This handshake checks; the others go on with the pair in use meanwhile.
            current.checked = Instant::now();
            (current.key.clone(), current.stamps)
        };
        let now = stamps(&self.cert_path, &self.key_path);
        if now.is_none() || now == seen {
            return Some(key);
        }
        let cert = PemFile::new(&self.cert_path, &self.options.0);
        let key_file = PemFile::new(&self.key_path, &self.options.1);
        match certified_key(cert, key_file, &self.provider) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
                current.key = loaded.clone();
                current.stamps = now;
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Some(loaded)
            }
            // Tried again at the next check: the files may still be being written.
            Err(e) => {
                tracing::warn!("TLS certificate not reloaded, the previous one stays: {e:#}");
                Some(key)
            }
        }
    }
}

/// The two files' stamps (`None` if either cannot be read).
fn stamps(cert: &Path, key: &Path) -> Option<(Stamp, Stamp)> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    };
    Some((stamp(cert)?, stamp(key)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;
    use crate::ClientTls;

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            server.accept(tcp).await.map(|_| ())
        });
        let identity = identity.map(|(c, k)| (PemFile::new(c, "--cert"), PemFile::new(k, "--key")));
        let client = ClientTls::new(Some(PemFile::new(ca, "--ca")), identity).unwrap();
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

    #[tokio::test]
    async fn with_a_client_ca_only_its_clients_get_in() {
        let dir = temp_dir("mutual");
        let (a, b) = (TestPki::new(), TestPki::new());
        let (cert, key, ca) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        );
        a.write_server(&cert, &key);
        a.write_ca(&ca);
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
}
