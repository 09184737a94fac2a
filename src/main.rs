//! `ferrolb`: one binary for every part of ferrolb.

mod files;
mod plan;

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
    /// Exits 1 when any input is invalid (the rest is still planned and printed).
    Plan {
        /// A YAML file or a directory of them (repeatable; `-` reads standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = plan::Format::Table)]
        output: plan::Format,
    },
    /// Print the CustomResourceDefinitions as YAML (what the Helm chart installs).
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan { files, output } => plan::run(&files, output),
        Command::Crds => print_crds(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
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
