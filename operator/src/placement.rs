//! Choosing a node for a new Sandbox: among the nodes whose agent is ready
//! and which the Sandbox's node selector allows, the one with the most free
//! memory that still fits it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use sandfork_api::Sandbox;

use crate::agents::AgentRecord;

/// What the Sandboxes bound to one node ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub memory_mib: u64,
    pub sandboxes: u32,
}

/// Sums the Sandboxes bound to each node, leaving out `except` (the UID of
/// the Sandbox being placed) and Sandboxes being deleted.
pub fn load_by_node<'a>(
    sandboxes: impl IntoIterator<Item = &'a Sandbox>,
    except: &str,
) -> HashMap<String, NodeLoad> {
    let mut load: HashMap<String, NodeLoad> = HashMap::new();
    for sandbox in sandboxes {
        if sandbox.metadata.uid.as_deref() == Some(except)
            || sandbox.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Some(node) = sandbox.node().or(sandbox.spec.node_name.as_deref()) else {
            continue;
        };
        let entry = load.entry(node.to_string()).or_default();
        entry.memory_mib += sandbox.spec.memory_mib;
        entry.sandboxes += 1;
    }
    load
}

/// Bindings this operator made that its Sandbox cache may not show yet, so
/// that Sandboxes placed one right after another do not all land on the
/// node that looked emptiest to each of them.
#[derive(Default)]
pub struct Reservations {
    /// Held while choosing, so that two placements do not interleave.
    pub lock: tokio::sync::Mutex<()>,
    bound: Mutex<HashMap<String, (String, u64, Instant)>>,
}

impl Reservations {
    /// How long a reservation counts; the cache catches up long before.
    const TTL: Duration = Duration::from_secs(30);

    pub fn reserve(&self, uid: &str, node: &str, memory_mib: u64) {
        self.bound.lock().expect("reservations lock").insert(
            uid.to_string(),
            (node.to_string(), memory_mib, Instant::now()),
        );
    }

    pub fn release(&self, uid: &str) {
        self.bound.lock().expect("reservations lock").remove(uid);
    }

    /// Adds to `load` the reservations that `sandboxes` (the cache) do not
    /// show as bound yet, except `except`; forgets expired ones and those
    /// the cache shows.
    pub fn add_to<'a>(
        &self,
        load: &mut HashMap<String, NodeLoad>,
        sandboxes: impl IntoIterator<Item = &'a Sandbox>,
        except: &str,
    ) {
        let bound_in_cache: std::collections::HashSet<&str> = sandboxes
            .into_iter()
            .filter(|s| s.node().is_some())
            .filter_map(|s| s.metadata.uid.as_deref())
            .collect();
        let mut reservations = self.bound.lock().expect("reservations lock");
        reservations.retain(|uid, (_, _, at)| {
            at.elapsed() < Self::TTL && !bound_in_cache.contains(uid.as_str())
        });
        for (uid, (node, memory_mib, _)) in reservations.iter() {
            if uid != except {
                let entry = load.entry(node.clone()).or_default();
                entry.memory_mib += memory_mib;
                entry.sandboxes += 1;
            }
        }
    }
}

/// Picks a node for a Sandbox of `memory_mib` MiB among `agents` for which
/// `allowed` holds, or says why none fits.
pub fn choose(
    agents: &[AgentRecord],
    load: &HashMap<String, NodeLoad>,
    memory_mib: u64,
    allowed: impl Fn(&str) -> bool,
    now: Timestamp,
) -> Result<String, String> {
    let mut why: Vec<String> = Vec::new();
    let mut best: Option<(u64, &str)> = None;
    for agent in agents {
        if !agent.is_ready(now) {
            why.push(format!(
                "{}: agent not ready ({})",
                agent.node,
                agent.unready_reason(now)
            ));
            continue;
        }
        if !allowed(&agent.node) {
            why.push(format!("{}: does not match the node selector", agent.node));
            continue;
        }
        let used = load.get(&agent.node).copied().unwrap_or_default();
        if agent.max_sandboxes > 0 && used.sandboxes >= agent.max_sandboxes {
            why.push(format!(
                "{}: runs {} sandboxes, its maximum",
                agent.node, used.sandboxes
            ));
            continue;
        }
        let free = agent.memory_mib.saturating_sub(used.memory_mib);
        if free < memory_mib {
            why.push(format!(
                "{}: {free} MiB free of {} MiB",
                agent.node, agent.memory_mib
            ));
            continue;
        }
        if best.is_none_or(|(best_free, _)| free > best_free) {
            best = Some((free, &agent.node));
        }
    }
    match best {
        Some((_, node)) => Ok(node.to_string()),
        None if agents.is_empty() => Err("no node agent has registered".into()),
        None => Err(format!("no node fits {memory_mib} MiB: {}", why.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn agent(node: &str, memory_mib: u64, now: Timestamp) -> AgentRecord {
        AgentRecord {
            node: node.into(),
            endpoint: "127.0.0.1:1".into(),
            memory_mib,
            max_sandboxes: 2,
            kvm: true,
            userfaultfd: true,
            renewed: Some(now),
            lease_duration: SignedDuration::from_secs(30),
        }
    }

    #[test]
    fn picks_the_node_with_most_free_memory() {
        let now = Timestamp::UNIX_EPOCH;
        let agents = [agent("a", 4096, now), agent("b", 4096, now)];
        let load = HashMap::from([(
            "a".to_string(),
            NodeLoad {
                memory_mib: 1024,
                sandboxes: 1,
            },
        )]);
        assert_eq!(choose(&agents, &load, 256, |_| true, now).unwrap(), "b");
        assert_eq!(choose(&agents, &load, 256, |n| n == "a", now).unwrap(), "a");
    }

    #[test]
    fn reservations_count_until_the_cache_shows_the_binding() {
        let reservations = Reservations::default();
        reservations.reserve("u1", "a", 1024);
        reservations.reserve("u2", "b", 512);
        let mut load = HashMap::new();
        reservations.add_to(&mut load, std::iter::empty(), "u2");
        assert_eq!(
            load.get("a"),
            Some(&NodeLoad {
                memory_mib: 1024,
                sandboxes: 1
            })
        );
        assert_eq!(load.get("b"), None, "the Sandbox being placed is left out");

        let mut cached = Sandbox::new(
            "x",
            serde_json::from_value(
                serde_json::json!({"guest": {"builtin": "Idle"}, "memoryMiB": 1024}),
            )
            .unwrap(),
        );
        cached.metadata.uid = Some("u1".into());
        cached.status = Some(sandfork_api::SandboxStatus {
            node: Some("a".into()),
            ..Default::default()
        });
        let mut load = HashMap::new();
        reservations.add_to(&mut load, [&cached], "");
        assert_eq!(load.get("a"), None, "the cache shows u1 now; counted there");
        assert_eq!(load.get("b").map(|l| l.memory_mib), Some(512));
    }

    #[test]
    fn says_why_nothing_fits() {
        let now = Timestamp::UNIX_EPOCH;
        let mut stale = agent("c", 8192, now);
        stale.renewed = Some(now - SignedDuration::from_secs(60));
        let agents = [agent("a", 512, now), stale];
        let err = choose(&agents, &HashMap::new(), 1024, |_| true, now).unwrap_err();
        assert!(err.contains("a: 512 MiB free"), "{err}");
        assert!(err.contains("c: agent not ready"), "{err}");
        let full = HashMap::from([(
            "a".to_string(),
            NodeLoad {
                memory_mib: 0,
                sandboxes: 2,
            },
        )]);
        let err = choose(&agents[..1], &full, 64, |_| true, now).unwrap_err();
        assert!(err.contains("its maximum"), "{err}");
        assert_eq!(
            choose(&[], &HashMap::new(), 64, |_| true, now).unwrap_err(),
            "no node agent has registered"
        );
    }
}
