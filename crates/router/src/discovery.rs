//! Discovery: where the endpoint set comes from.
//!
//! A [`Discovery`] publishes the current list of [`BackendSpec`]s on a `watch` channel; the router
//! applies each new list to its endpoint table (endpoints that stay keep their state and in-flight
//! requests; removed ones finish what they carry). The static discovery combines
//! `--static-backends` with the config file's `[[backends]]`, re-read when the file changes or on
//! SIGHUP. Kubernetes discovery (`crate::kubernetes`) is the other implementation: the ready
//! pods of a label selector.

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

/// Checks an endpoint URL: `http://host[:port]` or `https://host[:port]` with an optional path
/// prefix under which the engine serves `/v1/...`. What the router would silently get wrong is refused: a port out of
/// range, credentials (they would show in headers, logs and metrics labels), a query or
/// fragment, and a path ending in `/v1` (every request would go to `/v1/v1/...`).
pub fn validate_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "'{url}': scheme '{other}' is not supported; use http or https"
            ))
        }
        None => return Err(format!("'{url}' needs a scheme, e.g. http://{url}")),
    }
    let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
        return Err(format!("'{url}' has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "the URL of {host}: credentials in the URL are not supported (the router does not send them, \
             and would show them in headers, logs and metrics); clients' Authorization headers \
             reach the engines (see --forward-authorization)"
        ));
    }
    // No userinfo (refused above): the authority is the host, then an optional `:port`.
    let after_host = authority.as_str().strip_prefix(host).unwrap_or("");
    if let Some(port) = after_host.strip_prefix(':') {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(format!("'{url}': port '{port}' is not in 1..65535"));
        }
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(format!("'{url}': a query or fragment is not allowed"));
    }
    if uri.path().trim_end_matches('/').ends_with("/v1") {
        return Err(format!(
            "'{url}': give the engine's base URL without /v1 (the router adds /v1/...), \
             e.g. '{}'",
            url.trim_end_matches('/').trim_end_matches("/v1")
        ));
    }
    Ok(())
}

/// The form endpoints are compared and shown in: scheme and host in lower case (neither is case
/// sensitive), the port as a number and left out when it is the scheme's default, no trailing
/// slash. `HTTP://Engine:080/` and `http://engine` are one endpoint. The path keeps its case,
/// and an IPv6 zone id (`[fe80::1%25eth0]`) its own (interface names are case-sensitive). For
/// URLs [`validate_url`] accepts.
pub fn normalize_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let Ok(uri) = trimmed.parse::<http::Uri>() else {
        return trimmed.to_string();
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return trimmed.to_string();
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        _ => 80,
    };
    let port = match uri.port_u16() {
        Some(p) if p != default_port => format!(":{p}"),
        _ => String::new(),
    };
    let path = uri.path().trim_end_matches('/');
    let host = match host.split_once('%') {
        Some((address, zone)) => format!("{}%{zone}", address.to_ascii_lowercase()),
        None => host.to_ascii_lowercase(),
    };
    format!("{scheme}://{host}{port}{path}")
}

fn parse_role(role: Option<&str>, url: &str) -> anyhow::Result<Role> {
    Ok(match role.unwrap_or("both") {
        "both" => Role::Both,
        "prefill" => Role::Prefill,
        "decode" => Role::Decode,
        other => anyhow::bail!("backend {url}: role '{other}' is not one of both, prefill, decode"),
    })
}

/// SIGHUP, caught: `systemctl reload` and `kill -HUP` ask a discovery to look again at once,
/// and the signal's default action would end the router.
pub(crate) struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    pub(crate) fn new() -> Self {
        Hangup {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Waits for SIGHUP (then true) or `period` (then false), whichever comes first.
    pub(crate) async fn or_sleep(&mut self, period: Duration) -> bool {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut() {
            tokio::select! {
                got = signal.recv() => match got {
                    Some(()) => return true,
                    // No more signals to come: sleep from now on.
                    None => self.signal = None,
                },
                _ = sleep_for(period) => return false,
            }
        }
        sleep_for(period).await;
        false
    }
}

/// `tokio::time::sleep`, forever for `Duration::MAX`.
async fn sleep_for(period: Duration) {
    match tokio::time::Instant::now().checked_add(period) {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// Static endpoints from flags plus the config file's `[[backends]]`, watched for changes.
pub struct StaticDiscovery {
    flags: Vec<BackendSpec>,
    file: Option<PathBuf>,
    poll: Duration,
    last_seen: Option<SystemTime>,
    /// The settings the router runs with, less what the file gave (defaults there): a reloaded
    /// file is laid over them and checked as at start-up.
    base: RouterConfig,
    /// The settings the router runs with, key by key: what a reloaded file is compared with to
    /// say which of its settings wait for a restart.
    running: serde_json::Map<String, serde_json::Value>,
    /// The file's backend count at the last good read.
    file_backends: usize,
    /// What the last reload left waiting (see [`StaticDiscovery::pending`]).
    last_reload: Pending,
}

/// The settings names a reloaded file has that do not apply now.
#[derive(Debug, Default, PartialEq)]
struct Pending {
    /// Differ from the running settings: they apply at the next start.
    differ: Vec<String>,
    /// Overridden by a flag or `QOE_*` variable.
    overridden: Vec<String>,
}

impl StaticDiscovery {
    pub fn new(config: &RouterConfig) -> Self {
        let flags = config
            .static_backends
            .iter()
            .enumerate()
            .map(|(i, url)| BackendSpec {
                url: normalize_url(url),
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
            base: config.clone(),
            running: match serde_json::to_value(config) {
                Ok(serde_json::Value::Object(fields)) => fields,
                _ => serde_json::Map::new(),
            },
            file_backends: 0,
            last_reload: Pending::default(),
        }
    }

    /// The endpoint set: the flags' endpoints, then the file's. A reload is refused (the caller
    /// keeps the current set) when the file is invalid as a whole, as at start-up, or when it no
    /// longer lists backends at all while it had some: a file caught half-written, or emptied by
    /// mistake, must not take every endpoint away; `backends = []` does that on purpose.
    fn read(&mut self, reload: bool) -> anyhow::Result<Vec<BackendSpec>> {
        let mut specs = self.flags.clone();
        if let Some(path) = &self.file {
            self.last_seen = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let file = ConfigFile::read(path)?;
            if reload {
                anyhow::ensure!(
                    file.backends_listed || self.file_backends == 0,
                    "{}: the file lists no backends, which would remove all {} of its endpoints; \
                     to remove them on purpose write `backends = []` (in YAML `backends: []`)",
                    path.display(),
                    self.file_backends
                );
                // As at start-up: flags and `QOE_*` variables win over the file.
                let next = self
                    .base
                    .overlay(&file.settings, path, |key| self.base.file_sets(key))?;
                next.validate()
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
                self.last_reload = self.pending(&next, &file.settings);
                let Pending { differ, overridden } = &self.last_reload;
                if !differ.is_empty() {
                    tracing::warn!(
                        "{}: settings other than [[backends]] take effect at the next start: {} \
                         {} from the running settings",
                        path.display(),
                        differ.join(", "),
                        if differ.len() == 1 {
                            "differs"
                        } else {
                            "differ"
                        }
                    );
                }
                if !overridden.is_empty() {
                    tracing::info!(
                        "{}: {} set by a flag or QOE_* variable, which wins over the file",
                        path.display(),
                        overridden.join(", ")
                    );
                }
            }
            for (i, entry) in file.backends.iter().enumerate() {
                // Check them all before taking any: a bad entry refuses the whole reload.
                let bad = |e: String| anyhow::anyhow!("{}: backend {}: {e}", path.display(), i + 1);
                validate_url(&entry.url).map_err(bad)?;
                parse_role(entry.role.as_deref(), &entry.url)?;
                let url = normalize_url(&entry.url);
                let twice = file.backends[..i]
                    .iter()
                    .any(|e| normalize_url(&e.url) == url);
                if twice || self.flags.iter().any(|s| s.url == url) {
                    let by = if twice {
                        "the file"
                    } else {
                        "--static-backends (or the static_backends key)"
                    };
                    return Err(bad(format!("'{url}' is listed already, by {by}")));
                }
            }
            if !reload {
                self.base = self.base.without_file(&file.settings)?;
            }
            self.file_backends = file.backends.len();
            for BackendEntry { url, models, role } in file.backends {
                let role = parse_role(role.as_deref(), &url)?;
                let url = normalize_url(&url);
                specs.push(BackendSpec { url, models, role });
            }
        }
        Ok(specs)
    }

    /// The settings of a reloaded file that wait for the next start (only `[[backends]]`
    /// applies live): those of `next` that differ from the running ones. And the file's keys that
    /// a flag or `QOE_*` variable overrides, which never apply while it does. Both logged at
    /// every reload, so a change still pending is not forgotten by the next one.
    fn pending(&self, next: &RouterConfig, file: &toml::Table) -> Pending {
        let differ = match serde_json::to_value(next) {
            Ok(serde_json::Value::Object(next)) => next
                .into_iter()
                .filter(|(key, value)| self.running.get(key) != Some(value))
                .map(|(key, _)| key)
                .collect(),
            _ => Vec::new(),
        };
        let overridden = file
            .keys()
            .map(|key| key.replace('-', "_"))
            .filter(|key| !self.base.file_sets(key))
            .collect();
        Pending { differ, overridden }
    }

    fn modified(&self) -> Option<SystemTime> {
        self.file
            .as_ref()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }
}

impl Discovery for StaticDiscovery {
    fn initial(&mut self) -> anyhow::Result<Vec<BackendSpec>> {
        self.read(false)
    }

    fn run(
        mut self: Box<Self>,
        tx: watch::Sender<Vec<BackendSpec>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // SIGHUP is handled with or without a file: its default action would end the
            // router, and `systemctl reload` or `kill -HUP` mean "re-read", not "stop".
            let mut hangup = Hangup::new();
            if self.file.is_none() {
                loop {
                    hangup.or_sleep(Duration::MAX).await;
                    tracing::info!("SIGHUP: no --config file to re-read; nothing changed");
                }
            }
            loop {
                let forced = hangup.or_sleep(self.poll).await;
                if tx.is_closed() {
                    return;
                }
                if !forced && self.modified() == self.last_seen {
                    continue;
                }
                match self.read(true) {
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
        assert!(validate_url("ftp://x")
            .unwrap_err()
            .contains("http or https"));
        for ok in [
            "http://engine-1",
            "https://engine-1",
            "https://10.0.0.7:8443/prefix",
            "http://[::1]:8100",
            "http://10.0.0.7:65535/prefix/",
            "http://h:8000/v1beta",
        ] {
            assert_eq!(validate_url(ok), Ok(()), "{ok}");
        }
        let refused = [
            ("http://127.0.0.1:85555", "port '85555'"),
            ("http://127.0.0.1:0", "port '0'"),
            ("http://5:65536", "port '65536'"),
            ("http://0:0", "port '0'"),
            ("http://[::1]:x", "port 'x'"),
            ("http://user:secret@127.0.0.1:8100", "credentials"),
            ("http://127.0.0.1:8100/?a=b", "query"),
            ("http://127.0.0.1:8100/#top", "fragment"),
            ("http://127.0.0.1:8100/v1/", "e.g. 'http://127.0.0.1:8100'"),
        ];
        for (url, why) in refused {
            let e = validate_url(url).unwrap_err();
            assert!(e.contains(why) && !e.contains("secret"), "{url}: {e}");
        }
        for same in [
            "http://127.0.0.1:1/",
            "HTTP://127.0.0.1:1",
            "http://127.0.0.1:01",
            "Http://127.0.0.1:0001//",
        ] {
            let twice = RouterConfig::from_args([
                "x",
                "--static-backends",
                &format!("http://127.0.0.1:1,{same}"),
            ])
            .unwrap();
            let e = twice.validate().unwrap_err().to_string();
            assert!(e.contains("'http://127.0.0.1:1' twice"), "{same}: {e}");
        }
        for (url, normal) in [
            ("http://Engine-1:80/", "http://engine-1"),
            ("HTTPS://engine-1:443/prefix/", "https://engine-1/prefix"),
            ("https://engine-1:80", "https://engine-1:80"),
            ("http://[::1]:8100/", "http://[::1]:8100"),
            ("http://h:8000/Prefix", "http://h:8000/Prefix"),
            (
                "http://[FE80::1%25Eth0]:8100",
                "http://[fe80::1%25Eth0]:8100",
            ),
        ] {
            assert_eq!(normalize_url(url), normal, "{url}");
        }
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

    /// A reload that would empty the file's endpoints by omission, or that carries a setting the
    /// router would refuse at start-up, is refused; `backends = []` empties them on purpose.
    #[test]
    fn reload_refuses_a_file_that_drops_every_backend_or_is_invalid() {
        let path = std::env::temp_dir().join(format!("qoe-discovery-{}.toml", std::process::id()));
        let two = "[[backends]]\nurl = \"http://127.0.0.1:1\"\n\
                   [[backends]]\nurl = \"http://127.0.0.1:2\"\n";
        std::fs::write(&path, two).unwrap();
        let config = RouterConfig::from_args(["x", "--config", path.to_str().unwrap()]).unwrap();
        let mut d = StaticDiscovery::new(&config);
        assert_eq!(d.initial().unwrap().len(), 2);
        let reload = |d: &mut StaticDiscovery, text: &str| {
            std::fs::write(&path, text).unwrap();
            d.read(true)
        };
        for emptied in ["", "# being rewritten\n", "routing_logic = \"qoe\"\n"] {
            let e = reload(&mut d, emptied).unwrap_err().to_string();
            assert!(
                e.contains("lists no backends") && e.contains("backends = []"),
                "{e}"
            );
        }
        let e = reload(&mut d, &format!("engine_stats_interval = -1\n{two}")).unwrap_err();
        assert!(
            format!("{e:#}").contains("--engine-stats-interval"),
            "{e:#}"
        );
        let e = reload(&mut d, &format!("no_such_key = 1\n{two}")).unwrap_err();
        assert!(e.to_string().contains("no_such_key"), "{e}");
        let e = reload(&mut d, &format!("{two}[[backends]]\nurl = \"ftp://h\"\n")).unwrap_err();
        assert!(e.to_string().contains("backend 3"), "{e}");
        let e = reload(
            &mut d,
            &format!("{two}[[backends]]\nurl = \"http://127.0.0.1:2/\"\n"),
        );
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("'http://127.0.0.1:2' is listed already, by the file"),
            "{e}"
        );
        // As at start-up, a flag hides the file's value: a reload is not refused for it.
        let hidden = format!("queue_max = 0\n{two}");
        std::fs::write(&path, &hidden).unwrap();
        let flagged =
            RouterConfig::from_args(["x", "--config", path.to_str().unwrap(), "--queue-max", "10"])
                .unwrap();
        flagged.validate().unwrap();
        let mut f = StaticDiscovery::new(&flagged);
        assert_eq!(f.initial().unwrap().len(), 2);
        let more = format!("{hidden}[[backends]]\nurl = \"http://127.0.0.1:3\"\n");
        std::fs::write(&path, more).unwrap();
        assert_eq!(f.read(true).unwrap().len(), 3);
        // A setting that parses still needs a restart, but does not block the endpoints.
        let one = "max_retries = 3\n[[backends]]\nurl = \"http://127.0.0.1:1\"\n";
        assert_eq!(reload(&mut d, one).unwrap().len(), 1);
        assert!(reload(&mut d, "backends = []\n").unwrap().is_empty());
        // Once empty, a file without backends is no loss.
        assert!(reload(&mut d, "").unwrap().is_empty());
        let _ = std::fs::remove_file(&path);
    }

    /// Every reload names the settings that differ from those running, whatever the previous
    /// reload said: a change reverted is no longer pending, one still pending is named again, and
    /// a key a flag overrides is told apart.
    #[test]
    fn reload_names_the_settings_that_differ_from_those_running() {
        let path =
            std::env::temp_dir().join(format!("qoe-discovery-pending-{}.toml", std::process::id()));
        let backend = "[[backends]]\nurl = \"http://127.0.0.1:1\"\n";
        let write = |text: String| std::fs::write(&path, text).unwrap();
        write(format!(
            "routing_logic = \"least-loaded\"\nmax_retries = 1\n{backend}"
        ));
        let config = RouterConfig::from_args([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-retries",
            "1",
        ])
        .unwrap();
        let mut d = StaticDiscovery::new(&config);
        d.initial().unwrap();
        let mut reload = |text: String| {
            write(text);
            d.read(true).unwrap();
            (
                d.last_reload.differ.clone(),
                d.last_reload.overridden.clone(),
            )
        };
        let (differ, overridden) = reload(format!(
            "routing_logic = \"roundrobin\"\nmax_retries = 1\n{backend}"
        ));
        assert_eq!(differ, ["routing_logic"]);
        assert_eq!(overridden, ["max_retries"]);
        let (differ, _) = reload(format!(
            "routing_logic = \"roundrobin\"\ntarget_ttft = 500\n{backend}"
        ));
        assert_eq!(
            differ,
            ["routing_logic", "target_ttft"],
            "still pending, and the new one"
        );
        let (differ, overridden) = reload(format!(
            "routing_logic = \"least-loaded\"\nmax_retries = 5\n{backend}"
        ));
        assert!(
            differ.is_empty(),
            "reverted, and a flagged key's value does not apply: {differ:?}"
        );
        assert_eq!(overridden, ["max_retries"]);
        // A key the file no longer sets is back at its default: pending too.
        let (differ, _) = reload(backend.to_string());
        assert_eq!(differ, ["routing_logic"]);
        let _ = std::fs::remove_file(&path);
    }

    /// A reloaded file is checked as it would be at start-up: a key it no longer sets is back at
    /// its default, not at the old file's value.
    #[test]
    fn reload_checks_the_new_file_alone() {
        let path =
            std::env::temp_dir().join(format!("qoe-discovery-alone-{}.toml", std::process::id()));
        let backend = "[[backends]]\nurl = \"http://127.0.0.1:1\"\n";
        std::fs::write(&path, format!("admin_api_key = \"key-1\"\n{backend}")).unwrap();
        let config = RouterConfig::from_args(["x", "--config", path.to_str().unwrap()]).unwrap();
        config.validate().unwrap();
        let mut d = StaticDiscovery::new(&config);
        assert_eq!(d.initial().unwrap().len(), 1);
        // The same key moved from admin_api_key to api_keys: fine at start, so fine now.
        let moved = format!("api_keys = [\"key-1\"]\n{backend}");
        std::fs::write(&path, &moved).unwrap();
        RouterConfig::from_args(["x", "--config", path.to_str().unwrap()])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(d.read(true).unwrap().len(), 1);
        let _ = std::fs::remove_file(&path);
    }
}
