//! Failure-detection tuning, and its translation into foca's configuration.

use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use anyhow::{Context as _, ensure};

use super::sealing::MAX_FOCA_PACKET;

/// Failure-detection tuning.
///
/// A crashed node is declared down after, roughly, the wait until a survivor next probes
/// it (up to `probe_period` × members ÷ survivors, one period on average in a small
/// cluster), plus one `probe_period` (the failed probe), plus `suspect_to_down`.
/// The defaults aim at failover under 200 ms on a LAN: in the lab (3 nodes, real UDP
/// between network namespaces; `cargo bench --bench failover`) a dead owner's traffic
/// is cut for 160 ms (median; 210 ms at most), for about 50 packets/s sent per node,
/// and with every CPU busy no live node was declared down (`cargo bench --bench
/// membership_under_load`). The previous 50/20/100 ms cut it for 190 ms (300 ms at
/// most).
///
/// The trade-off: shorter periods detect failures faster but cost more packets (one
/// probe and one ack per `probe_period` per node), and a shorter `probe_rtt` or
/// `suspect_to_down` raises false suspicions when a node is loaded (a stalled process
/// misses its deadline) or the network drops packets; a suspicion not refuted within
/// `suspect_to_down` moves that node's IPs. On busy or lossy networks double them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How often each node probes one other member.
    pub probe_period: Duration,
    /// How long a direct probe may take before asking others to probe indirectly; must
    /// be shorter than `probe_period` (leave room for the indirect round trip).
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute the suspicion before it is declared
    /// down.
    pub suspect_to_down: Duration,
    /// How many members are asked to probe a silent member on our behalf.
    pub indirect_probes: usize,
    /// How often pending membership updates are pushed to others rather than waiting
    /// for the next probe (only sent when there are updates).
    pub gossip_period: Duration,
    /// How many times each update is passed on, at least: in a cluster of n members,
    /// [`Settings::transmissions_for`] raises it to 6·log10(n + 1).
    pub max_transmissions: u8,
    /// How often we announce ourselves to configured peers that are not live members
    /// (joining, healing a partition, a peer that restarted elsewhere).
    pub rejoin_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(40),
            probe_rtt: Duration::from_millis(15),
            suspect_to_down: Duration::from_millis(80),
            indirect_probes: 3,
            gossip_period: Duration::from_millis(20),
            max_transmissions: 6,
            rejoin_interval: Duration::from_millis(250),
        }
    }
}

impl Settings {
    /// How many times each update is passed on in a cluster of `members`. Each member
    /// that hears an update passes it on to this many others; a member the epidemic
    /// misses (about e^-k of them for k transmissions) learns of a death only when it
    /// probes the dead node itself, which takes up to members × `probe_period`. In the
    /// membership simulation (`cargo bench --bench membership_at_scale`) 6 or 10
    /// transmissions (memberlist's 4·log10(n + 1)) left a member seconds behind in some
    /// rounds at 200 members, and 12 or more none in 10 rounds at 200 and at 500, hence
    /// 6·log10(n + 1): 14 at 200, 23 at 5,000. The cost is a few more copies of each
    /// update, only while it spreads.
    pub fn transmissions_for(&self, members: usize) -> u8 {
        let scaled = (6.0 * ((members as f64) + 1.0).log10()).ceil();
        self.max_transmissions.max(scaled.min(255.0) as u8)
    }

    /// foca's configuration for a cluster of `members` (this node and its peers).
    pub(super) fn foca_config(&self, members: usize) -> anyhow::Result<foca::Config> {
        ensure!(
            !self.probe_rtt.is_zero() && self.probe_rtt < self.probe_period,
            "membership probe RTT ({:?}) must be above zero and below the probe period ({:?})",
            self.probe_rtt,
            self.probe_period
        );
        ensure!(
            !self.suspect_to_down.is_zero()
                && !self.gossip_period.is_zero()
                && !self.rejoin_interval.is_zero(),
            "membership suspicion timeout, gossip period and rejoin interval must be above zero"
        );
        let mut config = foca::Config::simple();
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_to_down;
        config.num_indirect_probes = NonZeroUsize::new(self.indirect_probes)
            .context("indirect probes must be at least 1")?;
        config.max_transmissions = NonZeroU8::new(self.transmissions_for(members))
            .context("max transmissions must be at least 1")?;
        config.max_packet_size = NonZeroUsize::new(MAX_FOCA_PACKET).context("packet size")?;
        // A node we declared down learns it and rejoins under a renewed identity.
        config.notify_down_members = true;
        // Discover members we were not told about (foca's LAN default).
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(30),
            num_members: NonZeroUsize::MIN,
        });
        // Down peers are re-announced to by our own rejoin loop, which also runs when we
        // are alone (foca's only runs while connected).
        config.periodic_announce_to_down_members = None;
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: config.num_indirect_probes,
        });
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small clusters keep the configured 6; larger ones pass each update on more often,
    /// as the epidemic needs about ln(n) rounds to reach everyone.
    #[test]
    fn transmissions_grow_with_the_cluster() {
        let s = Settings::default();
        let for_size: Vec<u8> = [1, 3, 30, 200, 1000, 5000]
            .iter()
            .map(|&n| s.transmissions_for(n))
            .collect();
        assert_eq!(for_size, [6, 6, 9, 14, 19, 23]);
        assert_eq!(s.foca_config(200).unwrap().max_transmissions.get(), 14);
    }

    #[test]
    fn default_settings_are_valid() {
        Settings::default().foca_config(3).expect("valid");
        let bad = Settings {
            probe_rtt: Duration::from_millis(60),
            ..Settings::default()
        };
        let error = bad
            .foca_config(3)
            .expect_err("an RTT above the probe period");
        assert!(
            error
                .to_string()
                .contains("must be above zero and below the probe period"),
            "{error}"
        );
    }
}
