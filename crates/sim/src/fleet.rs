//! Fleets as data: which engines serve, how fast, and how that changes during a run.
//!
//! A routing policy earns its keep on fleets that are *not* uniform: fast and slow GPUs side by
//! side, an engine that degrades mid-run (thermal throttling, a noisy neighbour, a bad NIC). The
//! fleet simulator and the scripts that start live simulated engines read the same TOML file, so a
//! scenario is described once:
//!
//! ```toml
//! name = "degrading-4"
//!
//! [[engines]]
//! profile = "h100-llama3-8b"   # a qoe-sim profile name (h100-llama3-8b, a100-llama3-8b, tiny)
//! speed = 1.0                  # multiplies the profile's speed (0.5 = every iteration twice as long)
//! count = 4
//! scheduling = "fcfs"          # or "priority" (vLLM's --scheduling-policy)
//!
//! [[changes]]
//! at_s = 60                    # seconds after the start of the run
//! engine = 2                   # 0-based index over the engines in file order
//! speed = 0.33                 # the new speed factor (here: 3× slower)
//! ```
//!
//! A change may also take an engine out of service (`available = false`) and bring it back.
//! Engines are numbered in file order: group by group, `count` engines each. `simulate` refuses a
//! change at or after the end of a run of known duration: it would never happen.

use crate::engine::Scheduling;
use crate::profile::{Profile, PROFILE_NAMES};
use crate::workload::{Num, WorkloadError};
use qoe_core::{Micros, MICROS_PER_SEC};
use serde::{Deserialize, Serialize};

/// Most engines a fleet file may describe.
pub const MAX_ENGINES: u32 = 100_000;

/// Most timed changes a fleet file may hold.
pub const MAX_CHANGES: usize = 100_000;

/// A group of identical engines, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineGroup {
    /// A [`Profile`] name.
    pub profile: String,
    /// Speed factor, > 0 (1 = the profile as measured).
    #[serde(default = "one")]
    pub speed: f64,
    #[serde(default = "one_u32")]
    pub count: u32,
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Label prefix for the engines of this group (default: the profile name).
    pub label: Option<String>,
}

fn one() -> f64 {
    1.0
}

fn one_u32() -> u32 {
    1
}

/// A timed change to one engine, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetChange {
    /// Seconds after the start of the run.
    pub at_s: f64,
    /// 0-based engine index (file order).
    pub engine: u32,
    /// New speed factor.
    pub speed: Option<f64>,
    /// Take the engine out of service (`false`) or bring it back (`true`).
    pub available: Option<bool>,
}

/// A fleet file, as written. [`Fleet::new`] checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub engines: Vec<EngineGroup>,
    #[serde(default)]
    pub changes: Vec<FleetChange>,
}

/// One engine of a fleet at the start of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineSpec {
    pub index: u32,
    /// `label#n`, unique in the fleet.
    pub label: String,
    pub profile: Profile,
    pub speed: f64,
    pub scheduling: Scheduling,
}

/// A checked change, in virtual time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Change {
    pub at: Micros,
    pub engine: u32,
    pub speed: Option<f64>,
    pub available: Option<bool>,
}

/// A checked fleet: engines expanded, changes sorted by time (stable: file order breaks ties).
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    name: String,
    engines: Vec<EngineSpec>,
    changes: Vec<Change>,
}

impl Fleet {
    /// Checks `spec`: known profiles, positive finite speeds, changes naming existing engines.
    pub fn new(spec: FleetSpec) -> Result<Fleet, WorkloadError> {
        let bad = |m: String| WorkloadError::Invalid(m);
        if spec.engines.is_empty() {
            return Err(bad("a fleet needs at least one engine".into()));
        }
        let total: u64 = spec.engines.iter().map(|g| g.count as u64).sum();
        if total > MAX_ENGINES as u64 {
            return Err(bad(format!("{total} engines, more than {MAX_ENGINES}")));
        }
        if spec.changes.len() > MAX_CHANGES {
            return Err(bad(format!("more than {MAX_CHANGES} changes")));
        }
        let mut engines = Vec::with_capacity(total as usize);
        for g in &spec.engines {
            let profile = Profile::by_name(&g.profile).ok_or_else(|| {
                bad(format!(
                    "unknown profile `{}` (known: {})",
                    g.profile,
                    PROFILE_NAMES.join(", ")
                ))
            })?;
            check_speed(g.speed)?;
            if g.count == 0 {
                return Err(bad(format!("profile `{}`: count must be ≥ 1", g.profile)));
            }
            if g.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
                return Err(bad(format!("profile `{}`: label is empty", g.profile)));
            }
            let label = g.label.clone().unwrap_or_else(|| profile.name.clone());
            for _ in 0..g.count {
                let index = engines.len() as u32;
                engines.push(EngineSpec {
                    index,
                    label: format!("{label}#{index}"),
                    profile: profile.clone(),
                    speed: g.speed,
                    scheduling: g.scheduling,
                });
            }
        }
        let mut changes = Vec::with_capacity(spec.changes.len());
        for c in &spec.changes {
            if !(c.at_s.is_finite() && c.at_s >= 0.0) {
                return Err(bad(format!("change at_s must be ≥ 0, got {}", Num(c.at_s))));
            }
            if c.engine as u64 >= total {
                return Err(bad(format!(
                    "change names engine {}, but the fleet's engines are numbered 0 to {} ({total})",
                    c.engine,
                    total - 1
                )));
            }
            if c.speed.is_none() && c.available.is_none() {
                return Err(bad(format!(
                    "the change at {} s to engine {} changes nothing (give speed or available)",
                    c.at_s, c.engine
                )));
            }
            if let Some(s) = c.speed {
                check_speed(s)?;
            }
            changes.push(Change {
                at: (c.at_s * MICROS_PER_SEC as f64).round() as Micros,
                engine: c.engine,
                speed: c.speed,
                available: c.available,
            });
        }
        changes.sort_by_key(|c| c.at);
        Ok(Fleet {
            name: spec.name,
            engines,
            changes,
        })
    }

    /// Parses and checks a fleet file's text.
    pub fn from_toml_str(text: &str) -> Result<Fleet, WorkloadError> {
        let spec: FleetSpec =
            toml::from_str(text).map_err(|e| WorkloadError::Parse(e.to_string()))?;
        Fleet::new(spec)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// The engines as they start.
    pub fn engines(&self) -> &[EngineSpec] {
        &self.engines
    }

    /// Timed changes, earliest first.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    pub fn len(&self) -> usize {
        self.engines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Speed factor and availability of `engine` at time `t`, after every change at or before
    /// `t`; `None` for an unknown engine.
    pub fn state_at(&self, engine: u32, t: Micros) -> Option<(f64, bool)> {
        let e = self.engines.get(engine as usize)?;
        let mut state = (e.speed, true);
        for c in self
            .changes
            .iter()
            .take_while(|c| c.at <= t)
            .filter(|c| c.engine == engine)
        {
            if let Some(s) = c.speed {
                state.0 = s;
            }
            if let Some(a) = c.available {
                state.1 = a;
            }
        }
        Some(state)
    }
}

fn check_speed(speed: f64) -> Result<(), WorkloadError> {
    if speed.is_finite() && speed > 0.0 && speed <= 1000.0 {
        Ok(())
    } else {
        Err(WorkloadError::Invalid(format!(
            "speed must be in (0, 1000], got {}",
            Num(speed)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HETERO: &str = r#"
name = "hetero"
[[engines]]
profile = "h100-llama3-8b"
count = 2
[[engines]]
profile = "a100-llama3-8b"
speed = 0.5
count = 2
scheduling = "priority"
label = "slow"
[[changes]]
at_s = 90
engine = 2
available = false
[[changes]]
at_s = 60
engine = 2
speed = 0.33
"#;

    #[test]
    fn expands_engines_and_sorts_changes() {
        let f = Fleet::from_toml_str(HETERO).unwrap();
        assert_eq!(f.name(), "hetero");
        assert_eq!(f.len(), 4);
        let e = f.engines();
        assert_eq!(e[0].label, "h100-llama3-8b#0");
        assert_eq!(e[3].label, "slow#3");
        assert_eq!((e[1].speed, e[2].speed), (1.0, 0.5));
        assert_eq!(e[2].scheduling, Scheduling::Priority);
        assert_eq!(e[0].scheduling, Scheduling::Fcfs);
        assert_eq!(e[2].profile.name, "a100-llama3-8b");
        assert_eq!(f.changes()[0].at, 60_000_000);
        assert_eq!(f.state_at(2, 59_999_999), Some((0.5, true)));
        assert_eq!(f.state_at(2, 60_000_000), Some((0.33, true)));
        assert_eq!(f.state_at(2, 100_000_000), Some((0.33, false)));
        assert_eq!(f.state_at(1, 100_000_000), Some((1.0, true)));
        assert_eq!(f.state_at(9, 0), None);
    }

    #[test]
    fn refuses_bad_fleets() {
        for (text, want) in [
            ("engines = []", "at least one"),
            ("[[engines]]\nprofile = \"b200\"", "unknown profile"),
            ("[[engines]]\nprofile = \"tiny\"\nspeed = 0", "speed"),
            ("[[engines]]\nprofile = \"tiny\"\ncount = 0", "count"),
            ("[[engines]]\nprofile = \"tiny\"\nsped = 1", "sped"),
            (
                "[[engines]]\nprofile = \"tiny\"\nlabel = \"\"",
                "label is empty",
            ),
            (
                "[[engines]]\nprofile = \"tiny\"\n[[changes]]\nat_s = 1\nengine = 1\nspeed = 1",
                "engine 1",
            ),
            (
                "[[engines]]\nprofile = \"tiny\"\n[[changes]]\nat_s = 1\nengine = 0",
                "changes nothing",
            ),
        ] {
            let err = Fleet::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
