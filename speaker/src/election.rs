//! Which node announces an IP: a pure function of the IP and the eligible nodes.
//!
//! Rendezvous (highest-random-weight) hashing: every node gets a score for the IP, the
//! highest score wins. Every speaker computes the same owner from the same inputs with no
//! coordination, and when a node leaves only the IPs it owned move (each to its own
//! runner-up); when it returns it takes back exactly those IPs. IPs spread over nodes
//! like independent fair dice.
//!
//! The score is [`ferrolb_api::hash::stable_hash64`] of the IP's bytes and the node name, so that speakers
//! built by different compilers or versions agree.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use ferrolb_api::hash::StableHasher;

/// What membership says about the nodes, as far as election needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// `None` when there is no membership: every declared node counts as alive and
    /// settled.
    pub members: Option<BTreeMap<String, MemberView>>,
}

/// One live node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberView {
    /// Subnets of the node's usable links, as it gossips them.
    pub subnets: Vec<IpNetwork>,
    /// Alive for longer than the rejoin hold-down.
    pub settled: bool,
    /// Whether the node's metadata has arrived; a node not heard from yet is not passed
    /// over for what it has not said (its gossip is milliseconds behind its liveness).
    pub known: bool,
    /// Its kube-proxy fails its health check: it may not deliver what it announces.
    pub proxy_failing: bool,
}

impl ClusterView {
    /// No membership: every node counts.
    pub fn everyone() -> ClusterView {
        ClusterView { members: None }
    }
}

/// The node that announces `ip` among `eligible` (any order, duplicates ignored), or
/// `None` when no node is eligible. Ties (a 2^-64 chance) go to the smaller name.
pub fn owner<'a>(ip: IpAddr, eligible: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<Candidate<'a>> = eligible
        .into_iter()
        .map(|name| Candidate {
            name,
            member: None,
            priority: 0,
        })
        .collect();
    elect(ip, &candidates)
}

/// The weight of `node` for `ip`.
pub fn score(ip: IpAddr, node: &str) -> u64 {
    Scorer::new(ip).score(node)
}

/// [`score`] for one IP against many nodes: the IP is hashed once.
#[derive(Clone, Copy)]
pub struct Scorer(StableHasher);

impl Scorer {
    pub fn new(ip: IpAddr) -> Scorer {
        Scorer(match ip {
            IpAddr::V4(v4) => StableHasher::default().part(&v4.octets()),
            IpAddr::V6(v6) => StableHasher::default().part(&v6.octets()),
        })
    }

    pub fn score(self, node: &str) -> u64 {
        self.0.part(node.as_bytes()).finish()
    }
}

/// A node that may own the IPs of one pool, resolved once for all of them: its name,
/// what membership says of it, and its priority (`nodePriorities`).
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// `None` without membership (every node counts as alive and settled).
    member: Option<&'a MemberView>,
    pub priority: i32,
}

impl ClusterView {
    /// The alive nodes of `eligible` (name, priority), with what membership says of
    /// each, for [`elect`]. Resolving once per pool rather than once per IP keeps the
    /// lookups out of the loop that runs IPs × nodes times.
    pub fn resolve<'a>(
        &'a self,
        eligible: impl IntoIterator<Item = (&'a str, i32)>,
    ) -> Vec<Candidate<'a>> {
        eligible
            .into_iter()
            .filter_map(|(name, priority)| {
                let member = match &self.members {
                    None => None,
                    Some(members) => Some(members.get(name)?),
                };
                Some(Candidate {
                    name,
                    member,
                    priority,
                })
            })
            .collect()
    }
}

/// (on the IP's segment, delivering, settled, priority): the higher ranks first.
type Rank = (bool, bool, bool, i32);

impl Candidate<'_> {
    /// What ranks a candidate for `ip`, most important first; the owner is a candidate of
    /// the highest rank:
    /// 1. with a link on a subnet holding the IP (or whose metadata has not arrived), so
    ///    that a node cut off from the IP's segment is never elected while another can
    ///    be (multi-subnet clusters, or a node whose announcing link went down);
    /// 2. whose kube-proxy passes its health check: a node that cannot deliver the
    ///    traffic does not draw it while another can;
    /// 3. settled (unknown metadata counts as not): a node that has just (re)joined takes
    ///    IPs back only after the hold-down, so a flapping node never drags IPs back and
    ///    forth;
    /// 4. the priority the advertisements give it (`nodePriorities`).
    ///
    /// Each step thus keeps the nodes that pass it when any does, and is ignored when
    /// none does. Dead nodes are never candidates ([`ClusterView::resolve`]).
    fn rank(&self, ip: IpAddr) -> Rank {
        match self.member {
            None => (true, true, true, self.priority),
            Some(m) => (
                !m.known || m.subnets.iter().any(|s| s.contains(ip)),
                !m.proxy_failing,
                m.known && m.settled,
                self.priority,
            ),
        }
    }
}

/// The owner of `ip` among `candidates` (from [`ClusterView::resolve`]): of those of the
/// highest rank, the one with the highest [`score`]; ties (a 2^-64 chance) go to the
/// smaller name. One pass with no allocation, and a node is scored only if it ranks with
/// the best so far: this is the loop a speaker runs IPs × nodes times after every change,
/// so a failover waits for it.
pub fn elect<'a>(ip: IpAddr, candidates: &[Candidate<'a>]) -> Option<&'a str> {
    elect_among(ip, candidates.iter())
}

/// Who would own `ip` if `owner` were gone: the node a failover gives it to, while the
/// others stay as they are.
pub fn runner_up<'a>(ip: IpAddr, candidates: &[Candidate<'a>], owner: &str) -> Option<&'a str> {
    elect_among(ip, candidates.iter().filter(|c| c.name != owner))
}

fn elect_among<'a, 'c>(
    ip: IpAddr,
    candidates: impl Iterator<Item = &'c Candidate<'a>>,
) -> Option<&'a str>
where
    'a: 'c,
{
    let scorer = Scorer::new(ip);
    let mut best: Option<(Rank, u64, &'a str)> = None;
    for c in candidates {
        let rank = c.rank(ip);
        if best.is_some_and(|(r, _, _)| rank < r) {
            continue;
        }
        let score = scorer.score(c.name);
        let wins = match best {
            None => true,
            Some((r, s, name)) => {
                (rank, score) > (r, s) || ((rank, score) == (r, s) && c.name < name)
            }
        };
        if wins {
            best = Some((rank, score, c.name));
        }
    }
    best.map(|(_, _, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i))
    }

    fn view(members: &[(&str, &[&str], bool)]) -> ClusterView {
        ClusterView {
            members: Some(
                members
                    .iter()
                    .map(|(name, subnets, settled)| {
                        let subnets = subnets.iter().map(|s| s.parse().unwrap()).collect();
                        (
                            name.to_string(),
                            MemberView {
                                subnets,
                                settled: *settled,
                                known: true,
                                proxy_failing: false,
                            },
                        )
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn only_alive_nodes_are_candidates_and_nobody_when_none_is() {
        let v = view(&[("a", &[], true), ("c", &[], true)]);
        assert_eq!(v.candidates(ip(1), &["a", "b", "c"]), ["a", "c"]);
        assert_eq!(v.candidates(ip(1), &["b"]), Vec::<&str>::new());
        assert_eq!(
            ClusterView::everyone().candidates(ip(1), &["a", "b"]),
            ["a", "b"]
        );
    }

    #[test]
    fn nodes_on_the_ips_segment_win_when_any_exists() {
        let v = view(&[
            ("a", &["192.0.2.0/24"], true),
            ("b", &["198.51.100.0/24"], true),
            ("c", &[], true),
        ]);
        assert_eq!(v.candidates(ip(1), &["a", "b", "c"]), ["a"]);
        let elsewhere: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            v.candidates(elsewhere, &["a", "b", "c"]),
            ["a", "b", "c"],
            "nobody has it: no narrowing"
        );
    }

    #[test]
    fn a_node_that_just_rejoined_waits_unless_nobody_else_can_serve() {
        let v = view(&[("a", &[], true), ("b", &[], false)]);
        assert_eq!(v.candidates(ip(1), &["a", "b"]), ["a"]);
        assert_eq!(
            v.candidates(ip(1), &["b"]),
            ["b"],
            "the only one: no waiting"
        );
        let all_new = view(&[("a", &[], false), ("b", &[], false)]);
        assert_eq!(
            all_new.candidates(ip(1), &["a", "b"]),
            ["a", "b"],
            "a cold start announces at once"
        );
    }

    #[test]
    fn a_node_whose_metadata_has_not_arrived_is_not_passed_over() {
        let mut v = view(&[("a", &["192.0.2.0/24"], false), ("b", &[], false)]);
        v.members.as_mut().unwrap().get_mut("b").unwrap().known = false;
        assert_eq!(
            v.candidates(ip(1), &["a", "b"]),
            ["a", "b"],
            "unknown subnets exclude nobody"
        );
        let mut v = view(&[
            ("a", &["192.0.2.0/24"], true),
            ("b", &["192.0.2.0/24"], true),
        ]);
        v.members.as_mut().unwrap().get_mut("b").unwrap().known = false;
        assert_eq!(
            v.candidates(ip(1), &["a", "b"]),
            ["a"],
            "unknown is not settled"
        );
    }

    /// Issue 23, item 2: a node whose kube-proxy fails is passed over while another on
    /// the segment passes, even a settled one for an unsettled one (it can deliver);
    /// when none passes, the check is ignored rather than leave the IP unannounced.
    #[test]
    fn a_node_whose_kube_proxy_fails_is_passed_over_while_another_can_deliver() {
        let lan = &["192.0.2.0/24"][..];
        let mut v = view(&[("a", lan, true), ("b", lan, false), ("c", &[], true)]);
        let failing = |v: &mut ClusterView, node: &str, failing: bool| {
            v.members
                .as_mut()
                .unwrap()
                .get_mut(node)
                .unwrap()
                .proxy_failing = failing;
        };
        assert_eq!(v.candidates(ip(1), &["a", "b", "c"]), ["a"]);
        failing(&mut v, "a", true);
        assert_eq!(v.candidates(ip(1), &["a", "b", "c"]), ["b"]);
        failing(&mut v, "b", true);
        assert_eq!(
            v.candidates(ip(1), &["a", "b", "c"]),
            ["a"],
            "none delivers: as if nobody checked (and c, off the segment, still not)"
        );
    }

    #[test]
    fn no_eligible_node_no_owner() {
        assert_eq!(owner(ip(1), []), None);
    }

    /// Values computed outside Rust (a few lines of Python implementing FNV-1a and
    /// splitmix64). A change here means speakers of two versions would disagree on
    /// owners during a rolling upgrade.
    #[test]
    fn scores_are_pinned() {
        let v4: IpAddr = "192.0.2.200".parse().unwrap();
        let v6: IpAddr = "2001:db8::200".parse().unwrap();
        assert_eq!(score(v4, "node-a"), 0xf546_26be_5d36_916a);
        assert_eq!(score(v4, "node-b"), 0x14b5_4569_f9ba_8306);
        assert_eq!(score(v6, "node-c"), 0x49fa_b9b7_87c1_60b6);
        assert_eq!(owner(v4, ["node-a", "node-b", "node-c"]), Some("node-a"));
        assert_eq!(owner(v6, ["node-c", "node-b", "node-a"]), Some("node-a"));
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        for i in 0..200 {
            let a = owner(ip(i), ["n1", "n2", "n3", "n2"]);
            let b = owner(ip(i), ["n3", "n1", "n2"]);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn ips_spread_over_nodes() {
        let nodes: Vec<String> = (0..5).map(|i| format!("worker-{i}")).collect();
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..10_000 {
            *count
                .entry(owner(ip(i), nodes.iter().map(String::as_str)).unwrap())
                .or_default() += 1;
        }
        // 2,000 expected each; 5 standard deviations is about ±200.
        for (node, n) in count {
            assert!((1_800..=2_200).contains(&n), "{node} owns {n} of 10000");
        }
    }

    impl ClusterView {
        /// The rule step by step, the way docs/failover.md tells it (the reference
        /// [`elect`] is held to): the nodes of `eligible` that may own `ip`, narrowed
        /// step by step, each step only when it leaves someone: alive, on the IP's
        /// segment, delivering, settled.
        pub fn candidates<'a>(&self, ip: IpAddr, eligible: &[&'a str]) -> Vec<&'a str> {
            let Some(members) = &self.members else {
                return eligible.to_vec();
            };
            let alive: Vec<&'a str> = eligible
                .iter()
                .copied()
                .filter(|n| members.contains_key(*n))
                .collect();
            let narrow = |from: Vec<&'a str>, keep: &dyn Fn(&MemberView) -> bool| {
                let kept: Vec<&'a str> = from
                    .iter()
                    .copied()
                    .filter(|n| keep(&members[*n]))
                    .collect();
                if kept.is_empty() { from } else { kept }
            };
            let on_segment = narrow(alive, &|m| {
                !m.known || m.subnets.iter().any(|s| s.contains(ip))
            });
            let delivering = narrow(on_segment, &|m| !m.proxy_failing);
            // Unknown metadata counts as not settled: a node must not take IPs back on the
            // strength of gossip that has not arrived.
            narrow(delivering, &|m| m.known && m.settled)
        }
    }

    /// The rule step by step: membership's narrowing, then the highest priority, then
    /// the highest score.
    fn step_by_step<'a>(
        view: &ClusterView,
        ip: IpAddr,
        eligible: &[(&'a str, i32)],
    ) -> Option<&'a str> {
        let names: Vec<&str> = eligible.iter().map(|(n, _)| *n).collect();
        let candidates = view.candidates(ip, &names);
        let priority = |n: &str| eligible.iter().find(|(e, _)| *e == n).map(|(_, p)| *p);
        let top = candidates.iter().filter_map(|c| priority(c)).max();
        owner(ip, candidates.into_iter().filter(|c| priority(c) == top))
    }

    /// A member as proptest draws it: (present, known, settled, kube-proxy failing, on
    /// the IP's subnet, priority).
    type Drawn = (bool, bool, bool, bool, bool, i32);

    proptest! {
        /// The one-pass election the speaker runs elects the node the rule, applied step
        /// by step, elects: for every mix of alive, unknown, unsettled, failing, off-segment
        /// and preferred nodes, and without membership.
        #[test]
        fn one_pass_elects_whom_the_steps_elect(
            drawn in prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0i32..3), 0..9),
            raw in any::<u32>(),
            membership in any::<bool>(),
        ) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | (raw & 0xffff)));
            let names: Vec<String> = (0..drawn.len()).map(|i| format!("node-{i}")).collect();
            let members = drawn.iter().zip(&names).filter(|((present, ..), _)| *present).map(
                |((_, known, settled, failing, on_segment, _), name): (&Drawn, _)| {
                    let subnet = if *on_segment { "10.0.0.0/16" } else { "192.168.0.0/16" };
                    (name.clone(), MemberView {
                        subnets: vec![subnet.parse().unwrap()],
                        settled: *settled,
                        known: *known,
                        proxy_failing: *failing,
                    })
                },
            );
            let view = ClusterView { members: membership.then(|| members.collect()) };
            let eligible: Vec<(&str, i32)> = names.iter().zip(&drawn).map(|(n, d)| (n.as_str(), d.5)).collect();
            prop_assert_eq!(elect(ip, &view.resolve(eligible.iter().copied())), step_by_step(&view, ip, &eligible));
        }

        /// Only the leaver's IPs move when a node leaves, and they all come back when it
        /// returns.
        #[test]
        fn a_leaving_node_moves_only_its_own_ips(n in 2usize..8, leaver in 0usize..8, ips in prop::collection::vec(any::<u32>(), 1..200)) {
            let leaver = leaver % n;
            let all: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let rest: Vec<&str> = all.iter().enumerate().filter(|(i, _)| *i != leaver).map(|(_, s)| s.as_str()).collect();
            for raw in ips {
                let addr = IpAddr::V4(raw.into());
                let before = owner(addr, all.iter().map(String::as_str)).unwrap();
                let after = owner(addr, rest.iter().copied()).unwrap();
                if before != all[leaver] {
                    prop_assert_eq!(before, after);
                } else {
                    prop_assert_ne!(after, before);
                }
                prop_assert_eq!(owner(addr, all.iter().map(String::as_str)).unwrap(), before);
            }
        }
    }
}
