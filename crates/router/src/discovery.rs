//! Discovery: where the endpoint set comes from.
//!
//! A [`Discovery`] publishes the current list of [`BackendSpec`]s on a `watch` channel; the router
//! applies each new list to its endpoint table (endpoints that stay keep their state and in-flight
//! requests; removed ones finish what they carry). The static discovery combines
//! `--static-backends` with the config file's `[[backends]]`, re-read when the file changes or on
//! SIGHUP. Kubernetes discovery will be another implementation of the same trait.

use crate::config::{BackendEntry, ConfigFile, RouterConfig};
use qoe_core::Role;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// One endpoint as discovery describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8100`.
    pub url: String,
    /// Models it serves; empty means "detect from `/v1/models`".
    pub models: Vec<String>,
    pub role: Role,
}

/// A source of endpoint sets.
pub trait Discovery: Send + 'static {
    /// The set known now (read synchronously at start, so the router never starts empty by accident).
    fn initial(&mut self) -> anyhow::Result<Vec<BackendSpec>>;
    /// Runs until the receiver side is gone, publishing every change.
    fn run(self: Box<Self>, tx: watch::Sender<Vec<BackendSpec>>) -> tokio::task::JoinHandle<()>;
}

/// Checks an endpoint URL: `http://host:port` with an optional path prefix.
pub fn validate_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "'{url}': scheme '{other}' is not supported; use http"
            ))
        }
        None => return Err(format!("'{url}' needs a scheme, e.g. http://{url}")),
    }
    if uri.host().is_none() {
        return Err(format!("'{url}' has no host"));
    }
    Ok(())
}

fn parse_role(role: Option<&str>, url: &str) -> anyhow::Result<Role> {
    Ok(match role.unwrap_or("both") {
        "both" => Role::Both,
        "prefill" => Role::Prefill,
        "decode" => Role::Decode,
        other => anyhow::bail!("backend {url}: role '{other}' is not one of both, prefill, decode"),
    })
}

/// Static endpoints from flags plus the config file's `[[backends]]`, watched for changes.
pub struct StaticDiscovery {
    flags: Vec<BackendSpec>,
    file: Option<PathBuf>,
    poll: Duration,
    last_seen: Option<SystemTime>,
}

impl StaticDiscovery {
    pub fn new(config: &RouterConfig) -> Self {
        let flags = config
            .static_backends
            .iter()
            .enumerate()
            .map(|(i, url)| BackendSpec {
                url: url.trim_end_matches('/').to_string(),
                models: match config.static_models.len() {
                    0 => Vec::new(),
                    1 => vec![config.static_models[0].clone()],
                    _ => vec![config.static_models[i].clone()],
                },
                role: Role::Both,
            })
            .collect();
        StaticDiscovery {
            flags,
            file: config.config.clone(),
            poll: Duration::from_secs(1),
            last_seen: None,
        }
    }

    fn read(&mut self) -> anyhow::Result<Vec<BackendSpec>> {
        let mut specs = self.flags.clone();
        if let Some(path) = &self.file {
            self.last_seen = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let file = ConfigFile::read(path)?;
            for BackendEntry { url, models, role } in file.backends {
                validate_url(&url).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let role = parse_role(role.as_deref(), &url)?;
                let url = url.trim_end_matches('/').to_string();
                if !specs.iter().any(|s| s.url == url) {
                    specs.push(BackendSpec { url, models, role });
                }
            }
        }
        Ok(specs)
    }

    fn modified(&self) -> Option<SystemTime> {
        self.file
            .as_ref()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }
}

impl Discovery for StaticDiscovery {
    fn initial(&mut self) -> anyhow::Result<Vec<BackendSpec>> {
        self.read()
    }

    fn run(
        mut self: Box<Self>,
        tx: watch::Sender<Vec<BackendSpec>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.file.is_none() {
                return;
            }
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let forced = match hangup.as_mut() {
                    Some(sig) => tokio::select! {
                        _ = sig.recv() => true,
                        _ = tokio::time::sleep(self.poll) => false,
                    },
                    None => {
                        tokio::time::sleep(self.poll).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(self.poll).await;
                    false
                };
                if tx.is_closed() {
                    return;
                }
                if !forced && self.modified() == self.last_seen {
                    continue;
                }
                match self.read() {
                    Ok(specs) => {
                        tracing::info!(endpoints = specs.len(), "endpoint set re-read");
                        tx.send_if_modified(|current| {
                            let changed = *current != specs;
                            *current = specs;
                            changed
                        });
                    }
                    // Keep serving the last good set; say why the new one was refused.
                    Err(e) => tracing::warn!(
                        "config reload refused, keeping the current endpoints: {e:#}"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_normalized() {
        assert!(validate_url("http://127.0.0.1:8100").is_ok());
        assert!(validate_url("127.0.0.1:8100")
            .unwrap_err()
            .contains("scheme"));
        assert!(validate_url("https://x").unwrap_err().contains("https"));
        let config = RouterConfig::from_args([
            "x",
            "--static-backends",
            "http://127.0.0.1:1/,http://127.0.0.1:2",
            "--static-models",
            "m",
        ])
        .unwrap();
        let mut d = StaticDiscovery::new(&config);
        let specs = d.initial().unwrap();
        assert_eq!(specs[0].url, "http://127.0.0.1:1");
        assert_eq!(specs[1].models, vec!["m".to_string()]);
    }
}
