//! Kubernetes discovery (`--service-discovery k8s`): the endpoints are the ready pods that
//! `--k8s-label-selector` selects in `--k8s-namespace`, each at `http://POD_IP:--k8s-port`, as in
//! vLLM's production-stack router (same flag names).
//!
//! The pods are listed from the API server every `--k8s-poll-interval` (and at once on SIGHUP)
//! rather than watched: a list is one GET, needs only `list` on pods in the namespace, has no
//! stream to resume after the API server restarts, and at a few seconds' period is as fresh as
//! the engines' own readiness probes. A pod counts while it runs, its `Ready` condition is true
//! and it is not being deleted, so a rolling update drains: the pod leaves the set when it turns
//! unready or terminating, and the requests it carries finish (the endpoint table keeps an
//! endpoint's in-flight requests). A failed listing keeps the last set; it never empties it.
//!
//! In the cluster, the API server, the service account's token (re-read at every listing, as
//! the kubelet rotates it) and its CA come from the standard places; `--k8s-api-server` points
//! elsewhere, e.g. `kubectl proxy` on `http://127.0.0.1:8001` from outside. A pod's label
//! `qoe-router/role` (`both`, `prefill`, `decode`) gives its role; models are detected from each
//! engine's `/v1/models`.

use crate::config::{ConfigFile, RouterConfig};
use crate::discovery::{BackendSpec, Discovery};
use crate::upstream::{self, UpstreamClient};
use http::HeaderValue;
use qoe_core::Role;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Where a pod finds its service account's credentials.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The pod label that gives an engine's role.
pub const ROLE_LABEL: &str = "qoe-router/role";
/// Largest pod list read (a label selector keeps it far smaller).
const MAX_LIST_BYTES: usize = 32 << 20;
/// The longest one listing may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct K8sDiscovery {
    /// The pods' list URL, selector included.
    list_url: String,
    port: u16,
    poll: Duration,
    /// The service account's token, when there is one to send.
    token_file: Option<PathBuf>,
    client: UpstreamClient,
    /// What the last listing's error said, to log a failure once, not every period.
    last_error: Option<String>,
    /// The last listing's pods with a bad role label, to warn of each once.
    bad_roles: Vec<(String, String)>,
    /// Whether a listing has succeeded yet.
    listed: bool,
}

impl K8sDiscovery {
    pub fn new(config: &RouterConfig) -> anyhow::Result<Self> {
        Self::with_service_account(config, Path::new(SERVICE_ACCOUNT))
    }

    /// As [`K8sDiscovery::new`], the service account's files read from `account`.
    pub fn with_service_account(config: &RouterConfig, account: &Path) -> anyhow::Result<Self> {
        if let Some(path) = &config.config {
            anyhow::ensure!(
                ConfigFile::read(path)?.backends.is_empty(),
                "{}: [[backends]] are for --service-discovery static; with k8s the endpoints \
                 are the pods",
                path.display()
            );
        }
        let in_cluster = || {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = match host.contains(':') {
                true => format!("[{host}]"),
                false => host,
            };
            Some(format!("https://{host}:{port}"))
        };
        let api = match &config.k8s_api_server {
            Some(url) => crate::discovery::normalize_url(url),
            None => in_cluster().ok_or_else(|| {
                anyhow::anyhow!(
                    "--service-discovery k8s outside a cluster needs --k8s-api-server (e.g. \
                     http://127.0.0.1:8001 for `kubectl proxy`): KUBERNETES_SERVICE_HOST is not set"
                )
            })?,
        };
        let namespace = match &config.k8s_namespace {
            Some(ns) => ns.clone(),
            None => std::fs::read_to_string(account.join("namespace"))
                .map(|ns| ns.trim().to_string())
                .unwrap_or_else(|_| "default".into()),
        };
        anyhow::ensure!(
            is_dns_label(&namespace),
            "--k8s-namespace: '{namespace}' is not a namespace name (lower-case letters, digits \
             and '-', at most 63)"
        );
        // The service account's token and CA go only to an https API server: never in clear.
        let https = api.starts_with("https://");
        let ca = account.join("ca.crt");
        let tls = match https && ca.exists() {
            true => qoe_tls::ClientTls::new(
                Some(qoe_tls::PemFile::new(&ca, "the service account's ca.crt")),
                None,
            )?,
            false => qoe_tls::ClientTls::new(None, None)?,
        };
        let token_file = Some(account.join("token")).filter(|t| https && t.exists());
        let selector = percent_encoding::utf8_percent_encode(
            config.k8s_label_selector.trim(),
            percent_encoding::NON_ALPHANUMERIC,
        );
        Ok(K8sDiscovery {
            // resourceVersion=0: from the API server's cache, not a quorum read of etcd.
            list_url: format!(
                "{api}/api/v1/namespaces/{namespace}/pods?labelSelector={selector}&resourceVersion=0"
            ),
            port: config.k8s_port,
            poll: Duration::from_secs_f64(config.k8s_poll_interval),
            token_file,
            client: upstream::client(
                Duration::from_millis(config.connect_timeout_ms),
                1,
                None,
                &tls,
            ),
            last_error: None,
            bad_roles: Vec::new(),
            listed: false,
        })
    }

    /// The endpoints of the pods listed now.
    async fn list(&self) -> anyhow::Result<Listed> {
        let authorization = match &self.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read the service account token {}: {e}",
                        path.display()
                    )
                })?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        anyhow::anyhow!("the service account token is not a header value")
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let client = self.client.with_authorization(authorization);
        let body = upstream::get(&client, &self.list_url, LIST_TIMEOUT, MAX_LIST_BYTES)
            .await
            .map_err(|e| match e {
                // The API server's Status says what was refused (it never echoes the token).
                upstream::GetError::Status(status, said) if !said.is_empty() => {
                    anyhow::anyhow!(
                        "listing the pods ({}): status {status}: {said}",
                        self.list_url
                    )
                }
                e => anyhow::anyhow!("listing the pods ({}): {e}", self.list_url),
            })?;
        endpoints_of(&body, self.port).map_err(|e| anyhow::anyhow!("the pod list: {e}"))
    }

    /// Lists the pods and publishes a changed set; a failure keeps the current one.
    async fn refresh(&mut self, tx: &watch::Sender<Vec<BackendSpec>>) {
        match self.list().await {
            Ok(Listed {
                endpoints: specs,
                bad_roles,
            }) => {
                if self.last_error.take().is_some() {
                    tracing::info!("listing the pods works again");
                }
                for (pod, value) in bad_roles.iter().filter(|b| !self.bad_roles.contains(b)) {
                    tracing::warn!(
                        pod = %pod,
                        "pod left out: label {ROLE_LABEL}={value} is not both, prefill or decode"
                    );
                }
                self.bad_roles = bad_roles;
                if specs.is_empty() && (!self.listed || !tx.borrow().is_empty()) {
                    tracing::warn!("no ready pod matches the label selector: no endpoints");
                }
                self.listed = true;
                tx.send_if_modified(|current| {
                    let changed = *current != specs;
                    if changed {
                        tracing::info!(
                            endpoints = specs.len(),
                            "pods listed: endpoint set changed"
                        );
                    }
                    *current = specs;
                    changed
                });
            }
            Err(e) => {
                let text = format!("{e:#}");
                if self.last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!("keeping the current endpoints: {text}");
                }
                self.last_error = Some(text);
            }
        }
    }
}

impl Discovery for K8sDiscovery {
    /// Empty: the first listing is the run's first step, moments after the router starts (an API
    /// server slow to answer must not hold up the router's own health and readiness routes).
    fn initial(&mut self) -> anyhow::Result<Vec<BackendSpec>> {
        Ok(Vec::new())
    }

    fn run(
        mut self: Box<Self>,
        tx: watch::Sender<Vec<BackendSpec>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // SIGHUP lists at once.
            let mut hangup = crate::discovery::Hangup::new();
            while !tx.is_closed() {
                self.refresh(&tx).await;
                if hangup.or_sleep(self.poll).await {
                    tracing::info!("SIGHUP: listing the pods");
                }
            }
        })
    }
}

/// A namespace name: an RFC 1123 label.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Checks `--k8s-api-server`: `http(s)://host[:port]`, nothing after it.
pub fn validate_api_server(url: &str) -> Result<(), String> {
    // Before parsing: the URL is quoted in what follows, and must not be if it holds a password.
    if url.contains('@') {
        return Err(
            "credentials in the URL are not sent: the router authenticates with the \
                    service account's token"
                .into(),
        );
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    let plain = uri.path() == "/" || uri.path().is_empty();
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() && plain && uri.query().is_none() => {
            Ok(())
        }
        _ => Err(format!(
            "'{url}' is not http(s)://host[:port] (the API server's address, no path)"
        )),
    }
}

/// A `PodList`, or whatever else the API server answered in its place (a `Status`, with its
/// message), read in one pass.
#[derive(Deserialize)]
struct PodList {
    kind: Option<String>,
    message: Option<String>,
    /// Required of a listing: a 200 without it must not empty the set.
    items: Option<Vec<Pod>>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: Metadata,
    #[serde(default, deserialize_with = "null_as_default")]
    status: Status,
}

/// A field sent as `null` read as absent: API servers omit empty fields, but proxies and
/// hand-written fixtures send `null`, and one pod's `null` must not fail the whole listing.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default, deserialize_with = "null_as_default")]
    name: String,
    deletion_timestamp: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    conditions: Vec<Condition>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

/// What one listing found: the endpoints, and the pods left out for a role label that is not a
/// role (name, label value).
#[derive(Debug, Default, PartialEq)]
pub struct Listed {
    pub endpoints: Vec<BackendSpec>,
    pub bad_roles: Vec<(String, String)>,
}

/// The endpoints of a pod list (the API's `PodList` JSON): one per running, ready pod that is
/// not being deleted and has an IP, at `http://IP:port`, sorted by URL. A pod whose role label
/// is not a role is left out (and named in [`Listed::bad_roles`]).
pub fn endpoints_of(list: &[u8], port: u16) -> Result<Listed, String> {
    let list: PodList = serde_json::from_slice(list)
        .map_err(|e| format!("not a PodList ({e}): {}", crate::upstream::excerpt(list)))?;
    if let Some(kind) = list.kind.as_deref().filter(|k| *k != "PodList") {
        let said = list.message.map(|m| format!(": {m}")).unwrap_or_default();
        return Err(format!("a {kind}, not a PodList{said}"));
    }
    let Some(items) = list.items else {
        return Err("no items: not a pod list".into());
    };
    let mut bad_roles = Vec::new();
    let mut specs: Vec<BackendSpec> = items
        .into_iter()
        .filter(|pod| {
            let ready = pod
                .status
                .conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True");
            ready
                && pod.status.phase.as_deref() == Some("Running")
                && pod.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|pod| {
            let ip: std::net::IpAddr = pod.status.pod_ip.as_deref()?.parse().ok()?;
            let role = match pod.metadata.labels.get(ROLE_LABEL).map(String::as_str) {
                None | Some("both") => Role::Both,
                Some("prefill") => Role::Prefill,
                Some("decode") => Role::Decode,
                Some(other) => {
                    bad_roles.push((pod.metadata.name.clone(), other.to_string()));
                    return None;
                }
            };
            let url = match ip {
                std::net::IpAddr::V4(ip) => format!("http://{ip}:{port}"),
                std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
            };
            Some(BackendSpec {
                // Shown as static ones are (`--k8s-port 80` leaves no `:80`).
                url: crate::discovery::normalize_url(&url),
                models: Vec::new(),
                role,
            })
        })
        .collect();
    specs.sort_by(|a, b| a.url.cmp(&b.url));
    specs.dedup_by(|a, b| a.url == b.url);
    Ok(Listed {
        endpoints: specs,
        bad_roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, extra: &str) -> String {
        format!(
            r#"{{"metadata":{{"name":"{name}"{extra}}},"status":{{"phase":"Running","podIP":"{ip}",
            "conditions":[{{"type":"Initialized","status":"True"}},{{"type":"Ready","status":"{}"}}]}}}}"#,
            if ready { "True" } else { "False" }
        )
    }

    #[test]
    fn ready_pods_are_the_endpoints() {
        let list = format!(
            r#"{{"kind":"PodList","items":[{},{},{},{},{},{}, {{"metadata":{{"name":"pending"}},"status":{{"phase":"Pending"}}}}]}}"#,
            pod("b", "10.0.0.2", true, ""),
            pod(
                "a",
                "10.0.0.1",
                true,
                r#","labels":{"app":"vllm","qoe-router/role":"prefill"}"#
            ),
            pod("unready", "10.0.0.3", false, ""),
            pod(
                "leaving",
                "10.0.0.4",
                true,
                r#","deletionTimestamp":"2026-12-07T10:00:00Z""#
            ),
            pod("v6", "fd00::7", true, ""),
            pod(
                "odd-role",
                "10.0.0.5",
                true,
                r#","labels":{"qoe-router/role":"kv_both"}"#
            ),
        );
        let listed = endpoints_of(list.as_bytes(), 8000).unwrap();
        assert_eq!(
            listed.bad_roles,
            [("odd-role".to_string(), "kv_both".to_string())]
        );
        let specs = listed.endpoints;
        let urls: Vec<(&str, Role)> = specs.iter().map(|s| (s.url.as_str(), s.role)).collect();
        assert_eq!(
            urls,
            [
                ("http://10.0.0.1:8000", Role::Prefill),
                ("http://10.0.0.2:8000", Role::Both),
                ("http://[fd00::7]:8000", Role::Both),
            ]
        );
        assert!(
            specs.iter().all(|s| s.models.is_empty()),
            "models are detected"
        );
        assert_eq!(
            endpoints_of(br#"{"items":[]}"#, 1).unwrap(),
            Listed::default()
        );
        // What is not a listing does not empty the set.
        assert_eq!(
            endpoints_of(b"<html>\n<p>Bad gateway</p>", 1).unwrap_err(),
            "not a PodList (expected value at line 1 column 1): <html> <p>Bad gateway</p>"
        );
        for not_a_list in [
            &b"<html>"[..],
            b"{}",
            br#"{"items":null}"#,
            br#"{"kind":"Status","items":[]}"#,
        ] {
            assert!(
                endpoints_of(not_a_list, 1).is_err(),
                "{}",
                String::from_utf8_lossy(not_a_list)
            );
        }
        // A pod's empty fields sent as null: that pod is read as without them, the rest stand.
        let nulls = format!(
            r#"{{"kind":"PodList","items":[{},{{"metadata":{{"name":"n","labels":null}},"status":{{"phase":"Running","podIP":"10.0.0.9","conditions":null}}}},{{"metadata":null,"status":null}}]}}"#,
            pod("b", "10.0.0.2", true, r#","labels":null"#),
        );
        let urls: Vec<String> = endpoints_of(nulls.as_bytes(), 8000)
            .unwrap()
            .endpoints
            .into_iter()
            .map(|s| s.url)
            .collect();
        assert_eq!(
            urls,
            ["http://10.0.0.2:8000"],
            "the unready pod is left out"
        );
        let status = br#"{"kind":"Status","status":"Failure","message":"too old resource version","code":410}"#;
        assert_eq!(
            endpoints_of(status, 1).unwrap_err(),
            "a Status, not a PodList: too old resource version"
        );
    }

    #[test]
    fn the_list_url_carries_the_namespace_and_the_encoded_selector() {
        let dir = std::env::temp_dir().join(format!("qoe-k8s-sa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("namespace"), "serving\n").unwrap();
        // A token is never sent over plain http.
        std::fs::write(dir.join("token"), "tok-1").unwrap();
        let config = RouterConfig::from_args([
            "x",
            "--service-discovery",
            "k8s",
            "--k8s-label-selector",
            "app=vllm,tier in (a,b)",
            "--k8s-api-server",
            "http://127.0.0.1:8001/",
        ])
        .unwrap();
        config.validate().unwrap();
        let d = K8sDiscovery::with_service_account(&config, &dir).unwrap();
        assert_eq!(
            d.list_url,
            "http://127.0.0.1:8001/api/v1/namespaces/serving/pods?labelSelector=app%3Dvllm%2Ctier%20in%20%28a%2Cb%29&resourceVersion=0"
        );
        assert!(d.token_file.is_none());
        // A namespace that is not a name, an API server with a path: refused.
        for (flag, value) in [("--k8s-namespace", "a/b?c"), ("--k8s-namespace", "")] {
            let bad = RouterConfig::from_args([
                "x",
                "--service-discovery",
                "k8s",
                "--k8s-label-selector",
                "app=vllm",
                "--k8s-api-server",
                "http://127.0.0.1:8001",
                flag,
                value,
            ])
            .unwrap();
            let err = K8sDiscovery::with_service_account(&bad, &dir)
                .err()
                .unwrap();
            assert!(err.to_string().contains("--k8s-namespace"), "{err}");
        }
        assert!(validate_api_server("https://10.0.0.1:443").is_ok());
        assert!(validate_api_server("http://127.0.0.1:8001/api").is_err());
        // Not echoed, even where the URL does not parse (a space in the password).
        for url in [
            "http://admin:hunter2@127.0.0.1:8001",
            "http://admin:hun ter2@host",
        ] {
            let creds = validate_api_server(url).unwrap_err();
            assert!(
                !creds.contains("hunter2") && !creds.contains("ter2"),
                "{creds}"
            );
        }
        // Without a selector, or with static backends too, it does not start.
        for args in [
            vec!["x", "--service-discovery", "k8s"],
            vec![
                "x",
                "--service-discovery",
                "k8s",
                "--k8s-label-selector",
                "app=vllm",
                "--static-backends",
                "http://127.0.0.1:1",
            ],
        ] {
            let err = RouterConfig::from_args(args)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains("--service-discovery k8s"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
