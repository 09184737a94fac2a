//! `ferrolb plan`: the allocator run offline on manifests, printed for a person or a
//! program.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use ferrolb_allocator::input;
use ferrolb_allocator::{Outcome, ServiceKey, Start};
use ferrolb_api::manifests::{Manifests, Origin};
use serde::Serialize;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

/// What `plan` prints in yaml and json.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub services: Vec<ServiceLine>,
    pub pools: Vec<PoolLine>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceLine {
    /// namespace/name
    pub service: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Why some of `ips` are no longer valid, though the Service keeps them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stranded: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct IpLine {
    pub ip: String,
    pub pool: String,
}

/// Counts as in the pool's status: IPv4 as numbers, IPv6 as decimal strings.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolLine {
    pub name: String,
    /// Ready, Invalid or Overlapping.
    pub status: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(rename = "assignedIPv4")]
    pub assigned_ipv4: u64,
    #[serde(rename = "availableIPv4")]
    pub available_ipv4: u64,
    #[serde(rename = "assignedIPv6")]
    pub assigned_ipv6: String,
    #[serde(rename = "availableIPv6")]
    pub available_ipv6: String,
}

/// `start`: [`Start::Lowest`] predicts the in-cluster controller, [`Start::Hashed`]
/// standalone speakers.
pub fn run(paths: &[PathBuf], format: Format, start: Start) -> anyhow::Result<ExitCode> {
    let input = crate::files::read(paths)?;
    let manifests = input.manifests;
    for w in &manifests.warnings {
        eprintln!("warning: {w}");
    }
    if !input.errors.is_empty() {
        for e in &input.errors {
            eprintln!("error: {e}");
        }
        eprintln!(
            "error: {} document(s) could not be read; nothing was planned",
            input.errors.len()
        );
        return Ok(ExitCode::from(1));
    }
    if manifests.pools.is_empty() && manifests.services.is_empty() {
        eprintln!("error: {}", nothing_to_plan(&input.read, &input.skipped));
        return Ok(ExitCode::from(1));
    }
    let (report, errors) = build(&manifests, start);
    print!("{}", render(&report, format)?);
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Why there is no plan: which files were read, and which were not.
fn nothing_to_plan(read: &[String], skipped: &[PathBuf]) -> String {
    let mut msg = if read.is_empty() {
        "nothing to plan: no .yaml, .yml or .json file found".to_string()
    } else {
        format!(
            "nothing to plan: no IPAddressPool or Service in {}",
            read.join(", ")
        )
    };
    if !skipped.is_empty() {
        let names: Vec<String> = skipped.iter().map(|p| p.display().to_string()).collect();
        let _ = write!(
            msg,
            "; skipped {} (only .yaml, .yml and .json files are read)",
            names.join(", ")
        );
    }
    msg
}

/// The plan for some manifests, and the input problems found (each naming file,
/// document and object). Pure.
pub fn build(m: &Manifests, start: Start) -> (Report, Vec<String>) {
    let mut errors = duplicates(m);
    let prepared = input::prepare(m);
    let plan = prepared.plan(start);
    errors.extend(prepared.problems);
    let checked = prepared.checked;
    let invalid = prepared.invalid;

    let mut services: BTreeMap<ServiceKey, ServiceLine> = plan
        .services
        .iter()
        .map(|(key, outcome)| (key.clone(), service_line(key, outcome)))
        .collect();
    for (key, reason) in invalid {
        services.insert(
            key.clone(),
            ServiceLine {
                service: key.to_string(),
                ips: vec![],
                pending: Some(reason),
                stranded: None,
                notes: vec![],
            },
        );
    }
    let pools = plan
        .pools
        .iter()
        .zip(&checked)
        .map(|(usage, c)| PoolLine {
            name: usage.name.clone(),
            status: c
                .problems
                .iter()
                .map(|p| p.kind.to_string())
                .min()
                .unwrap_or_else(|| "Ready".into()),
            problems: c.problems.iter().map(|p| p.message.clone()).collect(),
            assigned_ipv4: usage.assigned.ipv4 as u64,
            available_ipv4: usage.available.ipv4 as u64,
            assigned_ipv6: usage.assigned.ipv6.to_string(),
            available_ipv6: usage.available.ipv6.to_string(),
        })
        .collect();
    (
        Report {
            services: services.into_values().collect(),
            pools,
        },
        errors,
    )
}

fn service_line(key: &ServiceKey, outcome: &Outcome) -> ServiceLine {
    let (stranded, notes) = match outcome {
        Outcome::Assigned { notes, .. } => (None, notes.clone()),
        Outcome::Stranded { reason, notes, .. } => (Some(reason.clone()), notes.clone()),
        Outcome::Pending { .. } => (None, vec![]),
    };
    ServiceLine {
        service: key.to_string(),
        ips: outcome
            .assignments()
            .iter()
            .map(|a| IpLine {
                ip: a.ip.to_string(),
                pool: a.pool.clone(),
            })
            .collect(),
        pending: match outcome {
            Outcome::Pending { reason, .. } => Some(reason.clone()),
            _ => None,
        },
        stranded,
        notes,
    }
}

/// The same object twice would make the answer depend on which copy wins.
fn duplicates(m: &Manifests) -> Vec<String> {
    fn check<'a>(
        kind: &str,
        items: impl Iterator<Item = (String, &'a Origin)>,
        errors: &mut Vec<String>,
    ) {
        let mut seen: BTreeMap<String, &Origin> = BTreeMap::new();
        for (name, origin) in items {
            if let Some(first) = seen.insert(name.clone(), origin) {
                errors.push(format!(
                    "{origin} ({kind} {name:?}): defined again (first at {first}); the later copy wins"
                ));
            }
        }
    }
    let mut errors = Vec::new();
    let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.name.clone().unwrap_or_default()
    };
    check(
        "IPAddressPool",
        m.pools
            .iter()
            .map(|p| (name(&p.object.metadata), &p.origin)),
        &mut errors,
    );
    check(
        "Service",
        m.services
            .iter()
            .map(|s| (input::service_key(&s.object).to_string(), &s.origin)),
        &mut errors,
    );
    check(
        "Namespace",
        m.namespaces
            .iter()
            .map(|n| (name(&n.object.metadata), &n.origin)),
        &mut errors,
    );
    errors
}

pub fn render(report: &Report, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(report)? + "\n",
        Format::Yaml => serde_saphyr::to_string(report)?,
        Format::Table => table(report),
    })
}

fn table(report: &Report) -> String {
    let mut rows = vec![
        ["SERVICE", "EXTERNAL-IP", "POOL", "STATUS"]
            .map(String::from)
            .to_vec(),
    ];
    for s in &report.services {
        let join = |f: &dyn Fn(&IpLine) -> &str| {
            let mut parts: Vec<&str> = s.ips.iter().map(f).collect();
            parts.dedup();
            if parts.is_empty() {
                "<pending>".to_string()
            } else {
                parts.join(",")
            }
        };
        let status = match (&s.pending, &s.stranded) {
            (Some(reason), _) => format!("pending: {reason}"),
            (None, Some(why)) => format!("stranded: {why}"),
            (None, None) => "assigned".to_string(),
        };
        let status = if s.notes.is_empty() || s.pending.is_some() {
            status
        } else {
            format!("{status} ({})", s.notes.join("; "))
        };
        let pool = if s.ips.is_empty() {
            "-".to_string()
        } else {
            // A stranded IP may lie in no pool.
            join(&|i| if i.pool.is_empty() { "-" } else { &i.pool })
        };
        rows.push(vec![s.service.clone(), join(&|i| &i.ip), pool, status]);
    }
    let mut out = columns(&rows);
    out.push('\n');
    let mut rows = vec![
        [
            "POOL",
            "STATUS",
            "ASSIGNED-IPV4",
            "AVAILABLE-IPV4",
            "ASSIGNED-IPV6",
            "AVAILABLE-IPV6",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in &report.pools {
        rows.push(vec![
            p.name.clone(),
            p.status.clone(),
            p.assigned_ipv4.to_string(),
            p.available_ipv4.to_string(),
            p.assigned_ipv6.clone(),
            p.available_ipv6.clone(),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                let _ = writeln!(out, "{cell}");
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[c]);
            }
        }
    }
    out
}
