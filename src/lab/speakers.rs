//! Running the real `ferrolb speaker` on the lab's nodes, in standalone mode.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::{Host, Lab, LabProcess};

impl Lab {
    /// The Node objects of every lab node (named like the hosts, with their IPv4 and
    /// IPv6 as InternalIPs), for a speaker's manifest directory.
    pub fn node_manifests(&self) -> String {
        let mut out = String::new();
        for node in self.nodes() {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{kubernetes.io/hostname: {}}}\nstatus:\n  addresses:\n  \
                 - {{type: InternalIP, address: \"{}\"}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
                node.name(),
                node.name(),
                node.ipv4(),
                node.ipv6()
            );
        }
        out
    }
}

impl Host {
    /// Starts `BINARY speaker --manifests DIR --node-name NAME EXTRA...` in this host.
    pub fn spawn_speaker(
        &self,
        binary: &Path,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<LabProcess> {
        let mut args: Vec<String> = vec![
            "speaker".into(),
            "--manifests".into(),
            manifests.display().to_string(),
            "--node-name".into(),
            self.name().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(binary, args)
    }
}
