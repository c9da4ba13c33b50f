//! The process's open-files limit, which bounds how many connections the router can hold: each
//! request in flight has a client connection and an upstream one. Distributions start processes
//! with a soft limit of 1,024 under a hard limit far above it; the router raises the soft limit
//! to the hard one when it starts serving, as Go's runtime and nginx (`worker_rlimit_nofile`)
//! do, and sizes `--max-connections` from what it then has.

use rustix::process::{getrlimit, setrlimit, Resource};

/// The soft open-files limit (`None`: unlimited).
pub fn open_files() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises the soft open-files limit to the hard one; returns the limits before and after, or
/// `None` when it was already there (or the raise was refused).
pub fn raise_open_files() -> Option<(u64, Option<u64>)> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current?;
    if limit.maximum.is_some_and(|max| max <= before) {
        return None;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).ok()?;
    Some((before, open_files()))
}

/// The client connections allowed at once: `configured`, or with 0 half the open-files limit
/// (at least 64; 1,000,000 when unlimited).
pub fn max_connections(configured: usize, open_files: Option<u64>) -> usize {
    if configured > 0 {
        return configured;
    }
    match open_files {
        Some(n) => usize::try_from(n / 2).unwrap_or(usize::MAX).max(64),
        None => 1_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_is_half_the_open_files_unless_set() {
        assert_eq!(max_connections(500, Some(1024)), 500);
        assert_eq!(max_connections(0, Some(1024)), 512);
        assert_eq!(max_connections(0, Some(20)), 64);
        assert_eq!(max_connections(0, None), 1_000_000);
    }
}
