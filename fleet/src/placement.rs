//! Labels, selectors and the choice of nodes for `corral fleet apply --selector`: pure, so
//! the CLI and its tests share one definition.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{NodeRecord, Resources};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "{what} {text:?}: {reason} (write KEY=VALUE pairs separated by commas, e.g. zone=a,disk=ssd)"
    )]
    Labels {
        what: &'static str,
        text: String,
        reason: String,
    },
    #[error("--count {count}: only {matching} node(s) match {selector}{room} ({names})")]
    TooFew {
        count: usize,
        matching: usize,
        selector: String,
        /// ` and have room for ...` when the spec asks for something.
        room: String,
        names: String,
    },
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// `zone=a,disk=ssd` into a map; `what` names the flag in errors.
pub fn parse_labels(
    what: &'static str,
    text: &str,
) -> Result<BTreeMap<String, String>, PlacementError> {
    let err = |reason: String| PlacementError::Labels {
        what,
        text: text.to_string(),
        reason,
    };
    let mut labels = BTreeMap::new();
    if text.trim().is_empty() {
        return Ok(labels);
    }
    for pair in text.split(',') {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(err(format!("{pair:?} has no '='")));
        };
        let (k, v) = (k.trim(), v.trim());
        if !valid_label_part(k) || !valid_label_part(v) {
            return Err(err(format!(
                "{pair:?}: keys and values are 1 to 63 letters, digits, '.', '_', '-' or '/'"
            )));
        }
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(err(format!("{k:?} is given twice")));
        }
    }
    Ok(labels)
}

/// Equality on every label given: `zone=a,disk=ssd` matches nodes with both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, String>);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, PlacementError> {
        parse_labels("--selector", text).map(Selector)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// The free share of a node's allocatable CPU and memory (0..=2): how "empty" it is.
fn free_score(n: &NodeRecord) -> f64 {
    let free: Resources = n.free();
    let part = |free: f64, all: f64| if all > 0.0 { free / all } else { 0.0 };
    part(free.cpu, n.allocatable.cpu) + part(free.memory as f64, n.allocatable.memory as f64)
}

/// The nodes a selector places a service on: every match, or with `count` the `count`
/// matching nodes with the most free allocatable that have room for `need` (what the
/// service commits: its limits × replicas), spread over the values of the `spread` label
/// (one per value in turn, the emptiest first) when given. Nodes in `holding` (those that
/// already run the service) come before the others, so that applying an update again keeps
/// the service where it is. Names in the order picked.
pub fn pick(
    nodes: &[NodeRecord],
    selector: &Selector,
    count: Option<usize>,
    spread: Option<&str>,
    holding: &BTreeSet<String>,
    need: &Resources,
) -> Result<Vec<String>, PlacementError> {
    let mut matching: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| selector.matches(&n.labels))
        .filter(|n| count.is_none() || n.free().holds(need))
        .collect();
    let new = |n: &NodeRecord| !holding.contains(&n.node);
    // Holding first, then emptiest first; the name breaks ties so the choice is the same
    // every time.
    matching.sort_by(|a, b| {
        new(a)
            .cmp(&new(b))
            .then_with(|| free_score(b).total_cmp(&free_score(a)))
            .then_with(|| a.node.cmp(&b.node))
    });
    let Some(count) = count else {
        return Ok(matching.iter().map(|n| n.node.clone()).collect());
    };
    if matching.len() < count {
        return Err(PlacementError::TooFew {
            count,
            matching: matching.len(),
            selector: selector.to_string(),
            room: if need.cpu > 0.0 || need.memory > 0 {
                format!(
                    " and have room for cpu {} and memory {} bytes (see corral fleet nodes)",
                    need.cpu, need.memory
                )
            } else {
                String::new()
            },
            names: if matching.is_empty() {
                "none".into()
            } else {
                matching
                    .iter()
                    .map(|n| n.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    let Some(spread) = spread else {
        return Ok(matching
            .iter()
            .take(count)
            .map(|n| n.node.clone())
            .collect());
    };
    // Groups by the spread label's value (nodes without it form one group), each emptiest
    // first; take from the group with the fewest picks, the emptiest candidate on ties.
    let mut groups: BTreeMap<Option<&str>, Vec<&NodeRecord>> = BTreeMap::new();
    for n in &matching {
        groups
            .entry(n.labels.get(spread).map(String::as_str))
            .or_default()
            .push(n);
    }
    let mut taken: BTreeMap<Option<&str>, usize> = groups.keys().map(|k| (*k, 0)).collect();
    let mut picked = Vec::with_capacity(count);
    while picked.len() < count {
        let best = groups
            .iter()
            .filter_map(|(k, g)| g.get(taken[k]).map(|n| (*k, *n)))
            .min_by(|(ka, a), (kb, b)| {
                taken[ka]
                    .cmp(&taken[kb])
                    .then_with(|| new(a).cmp(&new(b)))
                    .then_with(|| free_score(b).total_cmp(&free_score(a)))
                    .then_with(|| a.node.cmp(&b.node))
            });
        let Some((key, node)) = best else { break };
        *taken.entry(key).or_default() += 1;
        picked.push(node.node.clone());
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &str, committed_cpu: f64) -> NodeRecord {
        NodeRecord {
            node: name.into(),
            labels: parse_labels("--node-labels", labels).expect("labels"),
            allocatable: Resources {
                cpu: 4.0,
                memory: 1 << 30,
            },
            committed: Resources {
                cpu: committed_cpu,
                memory: 0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn labels_parse_or_say_why() {
        let l = parse_labels("--node-labels", "zone=a, disk=ssd").expect("ok");
        assert_eq!(l.get("zone").map(String::as_str), Some("a"));
        assert_eq!(l.get("disk").map(String::as_str), Some("ssd"));
        assert!(parse_labels("--node-labels", "").expect("empty").is_empty());
        for (bad, why) in [
            ("zone", "has no '='"),
            ("zone=a,zone=b", "given twice"),
            ("=a", "keys and values"),
            ("zone=", "keys and values"),
            ("zo ne=a", "keys and values"),
        ] {
            let e = parse_labels("--node-labels", bad)
                .expect_err(bad)
                .to_string();
            assert!(e.contains(why) && e.contains("--node-labels"), "{bad}: {e}");
        }
    }

    #[test]
    fn selector_matches_every_label() {
        let s = Selector::parse("zone=a,disk=ssd").expect("ok");
        let l = |t| parse_labels("x", t).expect("labels");
        assert!(s.matches(&l("zone=a,disk=ssd,rack=3")));
        assert!(!s.matches(&l("zone=a")));
        assert!(!s.matches(&l("zone=b,disk=ssd")));
        assert!(Selector::parse("").expect("all").matches(&l("x=y")));
    }

    fn none_held() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn picks_the_emptiest_matching_nodes() {
        let nodes = [
            node("n1", "zone=a", 3.0),
            node("n2", "zone=a", 1.0),
            node("n3", "zone=b", 0.0),
            node("n4", "zone=a", 2.0),
        ];
        let a = Selector::parse("zone=a").expect("ok");
        assert_eq!(
            pick(
                &nodes,
                &a,
                Some(2),
                None,
                &none_held(),
                &Resources::default()
            )
            .expect("ok"),
            ["n2", "n4"]
        );
        assert_eq!(
            pick(&nodes, &a, None, None, &none_held(), &Resources::default()).expect("ok"),
            ["n2", "n4", "n1"]
        );
        let e = pick(
            &nodes,
            &a,
            Some(4),
            None,
            &none_held(),
            &Resources::default(),
        )
        .expect_err("too few");
        assert_eq!(
            e.to_string(),
            "--count 4: only 3 node(s) match zone=a (n2, n4, n1)"
        );
        let none = Selector::parse("zone=c").expect("ok");
        assert!(
            pick(
                &nodes,
                &none,
                Some(1),
                None,
                &none_held(),
                &Resources::default()
            )
            .expect_err("none")
            .to_string()
            .contains("(none)")
        );
    }

    #[test]
    fn spread_takes_one_per_value_in_turn() {
        let nodes = [
            node("a1", "zone=a", 0.0),
            node("a2", "zone=a", 0.5),
            node("b1", "zone=b", 3.0),
            node("c1", "zone=c", 2.0),
            node("x1", "", 0.0),
        ];
        let all = Selector::parse("").expect("ok");
        // Three zones and one node without the label: four groups; the emptiest of each
        // first, then the second of zone a.
        assert_eq!(
            pick(
                &nodes,
                &all,
                Some(3),
                Some("zone"),
                &none_held(),
                &Resources::default()
            )
            .expect("ok"),
            ["a1", "x1", "c1"]
        );
        assert_eq!(
            pick(
                &nodes,
                &all,
                Some(5),
                Some("zone"),
                &none_held(),
                &Resources::default()
            )
            .expect("ok"),
            ["a1", "x1", "c1", "b1", "a2"]
        );
    }

    #[test]
    fn nodes_without_room_are_not_picked() {
        let nodes = [
            node("n1", "zone=a", 3.5),
            node("n2", "zone=a", 2.5),
            node("n3", "zone=a", 0.0),
        ];
        let all = Selector::parse("").expect("ok");
        let need = Resources {
            cpu: 1.0,
            memory: 0,
        };
        assert_eq!(
            pick(&nodes, &all, Some(2), None, &none_held(), &need).expect("ok"),
            ["n3", "n2"]
        );
        let e = pick(&nodes, &all, Some(3), None, &none_held(), &need)
            .expect_err("n1 has 0.5 free")
            .to_string();
        assert!(
            e.contains("only 2 node(s)") && e.contains("have room for cpu 1"),
            "{e}"
        );
        // Without --count every match is written; the agents say which cannot admit it.
        assert_eq!(
            pick(&nodes, &all, None, None, &none_held(), &need)
                .expect("ok")
                .len(),
            3
        );
    }

    #[test]
    fn nodes_holding_the_service_keep_it() {
        let nodes = [
            node("n1", "zone=a", 3.0),
            node("n2", "zone=a", 0.0),
            node("n3", "zone=b", 0.0),
            node("n4", "zone=b", 1.0),
        ];
        let all = Selector::parse("").expect("ok");
        let held = BTreeSet::from(["n1".to_string(), "n4".to_string()]);
        assert_eq!(
            pick(&nodes, &all, Some(2), None, &held, &Resources::default()).expect("ok"),
            ["n4", "n1"],
            "the fuller nodes that hold it win over emptier ones"
        );
        assert_eq!(
            pick(
                &nodes,
                &all,
                Some(3),
                Some("zone"),
                &held,
                &Resources::default()
            )
            .expect("ok"),
            ["n4", "n1", "n2"]
        );
    }
}
