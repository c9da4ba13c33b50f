//! A certificate and its key, re-read when their files change: the router's own certificate
//! ([`crate::ServerTls`]) and the client certificate it presents to endpoints
//! ([`crate::ClientTls`]) both rotate (cert-manager, ACME, a mesh's short-lived certificates).
//!
//! The files are checked for a change (modification time, length, inode) at most once per
//! check interval, by the handshake that finds the check due and outside the lock every
//! handshake takes, and a changed pair is loaded for the handshakes after it. A pair that fails
//! to load (a half-written file, a key that does not match) keeps the previous one in use and
//! is logged, so a botched rotation never takes the router down; the router refuses to start
//! only on a pair that is bad at start.

use crate::{certified_key, PemFile};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often, at most, certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// What tells that a file changed: its modification time, length and inode.
type Stamp = (SystemTime, u64, u64);

/// The pair in use, what its files looked like when it was loaded, and when they were checked.
#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamps: Option<(Stamp, Stamp)>,
    checked: Instant,
}

/// A certificate chain and key loaded from two PEM files, reloaded when they change.
#[derive(Debug)]
pub(crate) struct ReloadingPair {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// The options that named the two files.
    options: (String, String),
    provider: Arc<CryptoProvider>,
    reload_check: Duration,
    state: Mutex<Current>,
}

impl ReloadingPair {
    /// Loads the pair (an error names the option and the file), to be checked for a change at
    /// most every `reload_check`.
    pub(crate) fn load(
        cert: PemFile<'_>,
        key: PemFile<'_>,
        provider: Arc<CryptoProvider>,
        reload_check: Duration,
    ) -> anyhow::Result<Self> {
        // Seen before the load: a rotation in between is loaded at the first check.
        let seen = stamps(cert.path, key.path);
        let loaded = certified_key(cert, key, &provider)?;
        Ok(ReloadingPair {
            cert_path: cert.path.to_path_buf(),
            key_path: key.path.to_path_buf(),
            options: (cert.option.to_string(), key.option.to_string()),
            provider,
            reload_check,
            state: Mutex::new(Current {
                key: Arc::new(loaded),
                stamps: seen,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate file's path.
    pub(crate) fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The pair for a handshake: the one in use, or the files' new one when the check is due
    /// and they changed.
    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        let (key, seen) = {
            let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if current.checked.elapsed() < self.reload_check {
                return current.key.clone();
            }
            // This handshake checks; the others go on with the pair in use meanwhile.
            current.checked = Instant::now();
            (current.key.clone(), current.stamps)
        };
        let now = stamps(&self.cert_path, &self.key_path);
        if now.is_none() || now == seen {
            return key;
        }
        let cert = PemFile::new(&self.cert_path, &self.options.0);
        let key_file = PemFile::new(&self.key_path, &self.options.1);
        match certified_key(cert, key_file, &self.provider) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
                current.key = loaded.clone();
                current.stamps = now;
                tracing::info!(
                    "{} {}: TLS certificate reloaded",
                    self.options.0,
                    self.cert_path.display()
                );
                loaded
            }
            // Tried again at the next check: the files may still be being written.
            Err(e) => {
                tracing::warn!("TLS certificate not reloaded, the previous one stays: {e:#}");
                key
            }
        }
    }
}

/// The router's own certificate: the same for every client.
impl rustls::server::ResolvesServerCert for ReloadingPair {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The client's one certificate, offered to every server that asks.
impl rustls::client::ResolvesClientCert for ReloadingPair {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
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
