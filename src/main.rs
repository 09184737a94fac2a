//! `ferrolb`: one binary for every part of ferrolb.

mod controller_command;
mod drain;
mod files;
mod import;
mod logging;
mod namespace;
mod plan;
mod speaker_command;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrolb",
    version,
    about = "LoadBalancer IPs for bare-metal Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which external IP each LoadBalancer Service would get, with no cluster.
    ///
    /// Reads IPAddressPools, Services (with or without status) and Namespaces from YAML
    /// files or directories, runs the allocator and prints, per Service, its IPs and
    /// pool or why it stays pending, then each pool's assigned and available counts.
    /// New Services get the lowest free address, as the in-cluster controller gives.
    /// Exits 1 when any input is invalid (the rest is still planned and printed).
    Plan {
        /// A YAML file or a directory of them (repeatable; `-` reads standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = plan::Format::Table)]
        output: plan::Format,
        /// Predict standalone speakers (`ferrolb speaker --manifests`) instead of the
        /// controller: each new Service starts at a point of the pool hashed from its name.
        #[arg(long)]
        standalone: bool,
    },
    /// Assign external IPs to LoadBalancer Services in a cluster.
    ///
    /// Watches Services, IPAddressPools and Namespaces, adopts every IP already in a
    /// Service's status, gives new Services the lowest free address of their pool, and
    /// writes status.loadBalancer.ingress, Events and pool status. Run two replicas: one
    /// is active through a Lease. SIGTERM releases the Lease and exits 0.
    Controller(controller_command::ControllerArgs),
    /// Why a LoadBalancer Service is pending or unreachable, and what to do about it.
    ///
    /// Walks the path an allocation and a packet take (class, controller, pool,
    /// L2Advertisement, eligible nodes, speakers, the announcing node, Pods, readiness,
    /// ports) and stops at the first broken link, with the evidence and the next thing to
    /// do. Reads the current cluster, or manifests with -f. Exits 0 only when the Service
    /// is healthy, so scripts can call it after `helm install`.
    Why(why::WhyArgs),
    /// Move a node's external IPs to other nodes before maintenance (`--undo` after).
    ///
    /// Labels the Node ferrolb.io/drain=true: every speaker's election passes it over,
    /// so each IP it announces goes to its runner-up, which announces it at once. Waits
    /// until the nodes' records show every IP announced elsewhere and prints where each
    /// went. Refuses when an IP would be left with no node (--force drains anyway).
    /// Exits 0 once everything moved, 1 when something did not in --timeout.
    Drain(drain::DrainArgs),
    /// Print the CustomResourceDefinitions as YAML (what the Helm chart installs).
    Crds,
    /// Convert another load balancer's configuration into ferrolb's, and check that no
    /// Service would change IP (`ferrolb import metallb`).
    Import(import::ImportArgs),
    /// Failover shown in a network-namespace lab: three nodes, a client, the owner killed.
    ///
    /// As root. Builds the lab, runs the real speaker on every node, shows which node owns
    /// the VIP, kills it and prints how long the client's traffic was cut. Tears
    /// everything down on exit or Ctrl-C.
    Lab(ferrolb::lab_command::LabArgs),
    /// Announce this node's external IPs (ARP, NDP, NodePort forwarding).
    ///
    /// In a cluster, announces the IPs the controller wrote in Service status, elects
    /// each IP's node with the other speakers, and says on the Service which node
    /// announces it. With --manifests, runs with no cluster: pools, L2Advertisements,
    /// Services, Nodes and EndpointSlices come from YAML files in DIR, re-read when they
    /// change. Needs CAP_NET_RAW and CAP_NET_ADMIN. SIGTERM withdraws everything and
    /// exits 0.
    Speaker(speaker_command::SpeakerArgs),
}

fn main() -> ExitCode {
    fewer_malloc_arenas();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan {
            files,
            output,
            standalone,
        } => {
            let start = if standalone {
                ferrolb_allocator::Start::Hashed
            } else {
                ferrolb_allocator::Start::Lowest
            };
            plan::run(&files, output, start)
        }
        Command::Controller(args) => controller_command::run(args),
        Command::Why(args) => why::run(args),
        Command::Drain(args) => drain::run(args),
        Command::Crds => print_crds(),
        Command::Import(args) => import::run(args),
        Command::Speaker(args) => speaker_command::run(args),
        Command::Lab(args) => ferrolb::lab_command::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc's malloc gives each thread that allocates an arena of its own, up to eight per
/// core, and keeps what they freed: a long-running watcher whose every event is parsed on
/// some worker thread then holds several times the memory it uses. Two arenas serve a
/// process with two worker threads as fast.
fn fewer_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn print_crds() -> anyhow::Result<ExitCode> {
    print!("{}", crds_yaml()?);
    Ok(ExitCode::SUCCESS)
}

/// The CRDs as one multi-document YAML stream.
fn crds_yaml() -> anyhow::Result<String> {
    let mut out = String::new();
    for crd in ferrolb_api::crds::all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The chart installs these files; they must be what the binary prints.
    #[test]
    fn chart_crds_match_the_generated_ones() {
        let generated = super::crds_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrolb/crds/crds.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "{path} is stale; regenerate it with `cargo run -- crds > charts/ferrolb/crds/crds.yaml`"
        );
    }

    /// The YAML means exactly the CRDs built from the Rust types (the CEL rules are
    /// folded over several lines; folding must not change them).
    #[test]
    fn crd_yaml_reads_back_as_the_same_crds() {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let yaml = super::crds_yaml().unwrap();
        let read: Vec<CustomResourceDefinition> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(read, ferrolb_api::crds::all());
    }
}
