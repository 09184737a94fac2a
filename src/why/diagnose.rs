//! Why a LoadBalancer Service is pending or unreachable: the path an allocation and a
//! packet take, walked in order, stopping at the first broken link. Pure: the facts are
//! gathered by the caller (from the cluster or from files).
//!
//! The links: the Service is a LoadBalancer of ferrolb's class; an active controller;
//! a pool gives it an IP; an L2Advertisement announces that pool; a node may announce it
//! and a speaker runs there; a node does announce it; its EndpointSlices list a ready
//! endpoint (what kube-proxy sends to; the Pods only explain why none is); the
//! targetPort is one the Pods expose; forwarding has a NodePort to go to.
//!
//! Every judgement the speakers and the controller also make is theirs, called here:
//! the allocation ([`input::Prepared::plan`]), the pool of an IP ([`input::pool_of`]),
//! the advertisements of a pool and a node's eligibility ([`announcements`]), the
//! election, the announced condition ([`report::reports`]; the controller writes it from
//! the nodes' NodeAnnouncements) and the Lease ([`ferrolb_kubernetes::lease`]), so `why`
//! cannot disagree with what they do.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_allocator::input::{self, Translation};
use ferrolb_allocator::{Outcome, ServiceKey, Shortfall, Start};
use ferrolb_api::Forwarding;
use ferrolb_api::announcement as report;
use ferrolb_api::manifests::Manifests;
use ferrolb_api::validation::ProblemKind;
use ferrolb_speaker::announcements::{self, Ineligible};
use ferrolb_speaker::election::{self, ClusterView};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// What the cluster says about ferrolb's own components (absent when reading files).
#[derive(Clone, Debug)]
pub struct Components {
    /// The controller's Lease: its holder, when it is still valid, else why not.
    pub controller: Result<String, String>,
    /// The speaker Pod on each node that has one.
    pub speakers: BTreeMap<String, Speaker>,
}

/// A node's speaker Pod as the cluster reports it.
#[derive(Clone, Debug, Default)]
pub struct Speaker {
    pub pod: String,
    pub ready: bool,
    /// Why it is not running, when its container says (`in CrashLoopBackOff (restarted
    /// 4 times; last exit code 1, Error)`).
    pub problem: Option<String>,
    /// Why kube-proxy fails its health check there, as the node's record says.
    pub kube_proxy_failing: Option<String>,
    /// The node's kernel answers ARP for VIPs it does not announce, as its record says.
    pub kernel_answers_arp: Option<String>,
}

/// Everything the diagnosis reads.
pub struct Facts {
    pub manifests: Manifests,
    /// Where ferrolb runs (for the commands suggested).
    pub ferrolb_namespace: String,
    /// The `loadBalancerClass` ferrolb serves besides none.
    pub class: String,
    /// `None` when reading files: what would run there is assumed to.
    pub components: Option<Components>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    pub service: String,
    pub healthy: bool,
    /// One sentence: what is wrong, or that nothing is.
    pub headline: String,
    /// What was looked at on the way.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
    /// What to do next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Diagnosis {
    fn stop(mut self, headline: String, next: impl Into<String>) -> Diagnosis {
        self.headline = headline;
        self.next = Some(next.into());
        self
    }
}

pub fn diagnose(f: &Facts, key: &ServiceKey) -> Diagnosis {
    let d = Diagnosis {
        service: key.to_string(),
        ..Default::default()
    };
    let m = &f.manifests;
    let Some(svc) = m
        .services
        .iter()
        .map(|l| &*l.object)
        .find(|s| input::service_key(s) == *key)
    else {
        return d.stop(
            format!("there is no Service {key}"),
            format!("kubectl get svc -A | grep {}", key.name),
        );
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind != "LoadBalancer" {
        return d.stop(
            format!("{key} is of type {kind}, not LoadBalancer: ferrolb serves LoadBalancer Services only"),
            "set spec.type: LoadBalancer",
        );
    }
    if let Some(class) = spec.load_balancer_class.as_deref()
        && class != f.class
    {
        return d.stop(
            format!(
                "{key} has loadBalancerClass {class}: that class's controller serves it, not ferrolb (which serves Services with no class or {})",
                f.class
            ),
            "spec.loadBalancerClass cannot be changed: recreate the Service without it, or run that class's controller",
        );
    }
    let mut d = d;
    let status_ips = ferrolb_allocator::input::ingress_ips(svc);
    let ips = if status_ips.is_empty() {
        match pending(f, svc, key, &mut d) {
            Ok(ips) => ips,
            Err(stopped) => return *stopped,
        }
    } else {
        d.evidence.push(format!(
            "status.loadBalancer.ingress: {}",
            list(&status_ips)
        ));
        // Written by another controller (MetalLB still running, a second ferrolb)?
        if let Some(writer) = input::ingress_writer(svc)
            && writer != ferrolb_controller::reconcile::FIELD_MANAGER
        {
            d.evidence.push(format!(
                "status.loadBalancer.ingress was last written by {writer:?}, not by ferrolb's controller"
            ));
            let configs = pool_configs(m);
            let outside: Vec<IpAddr> = status_ips
                .iter()
                .copied()
                .filter(|ip| input::pool_of(&configs, *ip).is_none())
                .collect();
            if !outside.is_empty() {
                return d.stop(
                    format!(
                        "{key} is served by another controller: {writer:?} wrote {} to its status, in no IPAddressPool of ferrolb's",
                        list(&outside)
                    ),
                    "let one controller serve it: give the Service a spec.loadBalancerClass, or remove the other controller (docs/migration.md)",
                );
            }
        }
        // Assigned earlier, and nothing of ferrolb's runs now (uninstalled, say).
        if let Some(c) = &f.components
            && c.speakers.is_empty()
            && let Err(controller) = &c.controller
        {
            return d.stop(
                format!(
                    "ferrolb is not running: no speaker Pod runs in namespace {}, and no controller is active ({controller})",
                    f.ferrolb_namespace
                ),
                format!(
                    "install it (helm install ferrolb charts/ferrolb -n {} --create-namespace, docs/install.md), or pass --ferrolb-namespace where it runs",
                    f.ferrolb_namespace
                ),
            );
        }
        status_ips
    };
    d.ips = ips.clone();
    let mut owners = Vec::new();
    let mut forwarding = false;
    for ip in &ips {
        match announced(f, svc, *ip, &mut d) {
            Ok((node, forwards)) => {
                owners.push(node);
                forwarding |= forwards;
            }
            Err(stopped) => return *stopped,
        }
    }
    let owner = owners.first().cloned();
    d.node = owner.clone();
    if let Err(stopped) = traffic(f, svc, owner.as_deref(), &ips, forwarding, &mut d) {
        return *stopped;
    }
    let announced: Vec<String> = ips
        .iter()
        .zip(&owners)
        .map(|(ip, node)| format!("{ip} announced by {node}"))
        .collect();
    d.healthy = true;
    d.headline = format!("{key} is healthy: {}", announced.join("; "));
    d
}

/// No IP in status: why, or the IPs it would get (reading files, where nobody assigns).
fn pending(
    f: &Facts,
    svc: &Service,
    key: &ServiceKey,
    d: &mut Diagnosis,
) -> Result<Vec<IpAddr>, Box<Diagnosis>> {
    let stop =
        |d: &Diagnosis, headline: String, next: &str| Box::new(d.clone().stop(headline, next));
    if let Translation::Invalid { reason, .. } = input::translate_for_class(svc, &f.class) {
        return Err(stop(
            d,
            format!("{key} is pending: {reason}"),
            "fix the Service's annotations or spec",
        ));
    }
    let m = &f.manifests;
    let prepared = input::prepare_for_class(m, &f.class);
    let plan = prepared.plan(Start::Lowest);
    for p in &plan.pools {
        let checked = prepared.checked.iter().find(|c| c.name == p.name);
        let state = match checked.and_then(|c| c.problems.first()) {
            Some(problem) => format!("not usable: {}", problem.message),
            None => format!(
                "{} of {} IPv4 and {} of {} IPv6 addresses in use",
                p.assigned.ipv4,
                p.assigned.ipv4 + p.available.ipv4,
                p.assigned.ipv6,
                p.assigned.ipv6 + p.available.ipv6
            ),
        };
        d.evidence.push(format!("pool {}: {state}", p.name));
    }
    match plan.services.get(key) {
        Some(Outcome::Pending { reason, kind }) => {
            let unresolved = prepared
                .checked
                .iter()
                .any(|c| c.problems.iter().any(|p| p.kind == ProblemKind::Unresolved));
            let next = if m.pools.is_empty() {
                "create an IPAddressPool (docs/api.md)"
            } else if *kind == Shortfall::NoPool && unresolved {
                "a fromNodeNetwork pool gets its addresses from the speakers: an L2Advertisement must announce it, and status.nodeNetwork says what they found (kubectl get ippool -o yaml; docs/api.md)"
            } else if *kind == Shortfall::Exhausted {
                "add addresses to the pool, or another pool open to this Service"
            } else if *kind == Shortfall::RequestedUnavailable {
                "request a free address of a pool open to this Service, or remove the request"
            } else {
                "open a pool to this Service (spec.serviceAllocation, autoAssign) or name one with ferrolb.io/address-pool"
            };
            Err(stop(d, format!("{key} is pending: {reason}"), next))
        }
        Some(outcome) => {
            let ips: Vec<IpAddr> = outcome.assignments().iter().map(|a| a.ip).collect();
            match &f.components {
                // In a cluster: a pool has an IP for it, so the controller is not acting.
                Some(c) => Err(match &c.controller {
                    Err(why) => stop(
                        d,
                        format!("{key} is pending because no ferrolb controller is active: {why}"),
                        &format!(
                            "kubectl -n {0} get pods -l app.kubernetes.io/component=controller; kubectl -n {0} logs -l app.kubernetes.io/component=controller",
                            f.ferrolb_namespace
                        ),
                    ),
                    Ok(holder) => stop(
                        d,
                        format!(
                            "{key} is pending, though a pool has {} for it: the active controller ({holder}) has not assigned it yet",
                            list(&ips)
                        ),
                        &format!("kubectl -n {} logs {holder}", f.ferrolb_namespace),
                    ),
                }),
                None => {
                    d.evidence.push(format!(
                        "no IP in status; ferrolb would assign {}",
                        list(&ips)
                    ));
                    Ok(ips)
                }
            }
        }
        None => Err(stop(
            d,
            format!("{key} is pending"),
            "ferrolb plan -f ... shows the allocation",
        )),
    }
}

/// Who announces `ip` and whether it is forwarded, or where the announcement breaks.
fn announced(
    f: &Facts,
    svc: &Service,
    ip: IpAddr,
    d: &mut Diagnosis,
) -> Result<(String, bool), Box<Diagnosis>> {
    let stop =
        |d: &Diagnosis, headline: String, next: &str| Box::new(d.clone().stop(headline, next));
    let ns = &f.ferrolb_namespace;
    let m = &f.manifests;
    let configs = pool_configs(m);
    // As the speaker does.
    let pool = input::pool_of(&configs, ip)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let labels = m
        .pools
        .iter()
        .find(|p| p.object.metadata.name.as_deref() == Some(pool.as_str()))
        .and_then(|p| p.object.metadata.labels.clone());
    let advs = announcements::advertising(m, &pool, labels.as_ref());
    if pool.is_empty() {
        return Err(stop(
            d,
            format!(
                "{ip} is assigned but is in no IPAddressPool: its pool was deleted or no longer holds it, so no node announces it"
            ),
            "kubectl get ipaddresspools; put the address back in a pool, or delete the Service's status IP by recreating the Service",
        ));
    }
    if advs.is_empty() {
        return Err(stop(
            d,
            format!(
                "{ip} is assigned but nobody answers for it: no L2Advertisement announces pool {pool}"
            ),
            "create an L2Advertisement naming the pool (ipAddressPools), or one with an empty spec to announce every pool",
        ));
    }
    let forwards = advs
        .iter()
        .any(|a| a.spec.forwarding == Forwarding::NodePort);
    let names: Vec<String> = advs
        .iter()
        .filter_map(|a| a.metadata.name.clone())
        .collect();
    d.evidence.push(format!(
        "{ip} is in pool {pool}, announced by L2Advertisement {}",
        names.join(", ")
    ));

    let local = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        == Some("Local");
    let slices: Vec<_> = m.endpoint_slices.iter().map(|s| &*s.object).collect();
    let mut eligible = Vec::new();
    let mut excluded = Vec::new();
    for node in m.nodes.iter().map(|n| &*n.object) {
        let name = node.metadata.name.clone().unwrap_or_default();
        // The rule the speakers apply.
        let why = announcements::ineligible(node, &advs).or_else(|| {
            (local && !announcements::has_ready_endpoint(&slices, svc, &name))
                .then_some(Ineligible::NoLocalEndpoint)
        });
        match why {
            Some(why) => excluded.push(format!("{name}: {why}")),
            None => eligible.push(name),
        }
    }
    if eligible.is_empty() {
        let why = if m.nodes.is_empty() {
            "there are no Nodes".to_string()
        } else {
            excluded.join("; ")
        };
        return Err(stop(
            d,
            format!("{ip} is assigned but no node may announce it: {why}"),
            if local {
                "make a Pod of the Service Ready (externalTrafficPolicy: Local needs a ready endpoint on the announcing node)"
            } else {
                "check the L2Advertisement's nodeSelectors, the node labels node.kubernetes.io/exclude-from-external-load-balancers and ferrolb.io/drain (`ferrolb drain --undo NODE`), and node readiness"
            },
        ));
    }
    if !excluded.is_empty() {
        d.evidence
            .push(format!("not eligible: {}", excluded.join("; ")));
    }
    let Some(components) = &f.components else {
        // Reading files: the speakers' election, with every eligible node alive.
        let everyone = ClusterView::everyone();
        let no_labels = Default::default();
        let candidates = everyone.resolve(m.nodes.iter().filter_map(|n| {
            let name = n.object.metadata.name.as_deref()?;
            let labels = n.object.metadata.labels.as_ref().unwrap_or(&no_labels);
            eligible
                .iter()
                .any(|e| e == name)
                .then(|| (name, announcements::priority(&advs, labels)))
        }));
        let owner = election::elect(ip, &candidates).unwrap_or_default();
        d.evidence.push(format!(
            "eligible: {} (with every speaker up, {owner} announces)",
            eligible.join(", ")
        ));
        return Ok((owner.to_string(), forwards));
    };
    let running: Vec<&String> = eligible
        .iter()
        .filter(|n| components.speakers.get(*n).is_some_and(|s| s.ready))
        .collect();
    if running.is_empty() {
        let states: Vec<String> = eligible
            .iter()
            .map(|n| match components.speakers.get(n) {
                None => format!("{n}: no speaker Pod"),
                Some(s) => match &s.problem {
                    Some(problem) => format!("{n}: speaker {} is {problem}", s.pod),
                    None => format!("{n}: speaker {} is not Ready", s.pod),
                },
            })
            .collect();
        let failing = eligible
            .iter()
            .filter_map(|n| components.speakers.get(n))
            .find(|s| s.problem.is_some());
        return Err(stop(
            d,
            format!(
                "{ip} is assigned but no ready speaker runs on the nodes that may announce it ({})",
                states.join("; ")
            ),
            &match failing {
                Some(s) => format!(
                    "kubectl -n {ns} logs {} --previous (why it exits), and kubectl -n {ns} describe pod {}",
                    s.pod, s.pod
                ),
                None => format!(
                    "kubectl -n {ns} get pods -o wide -l app.kubernetes.io/component=speaker (check the DaemonSet's nodeSelector and tolerations, and the nodes' taints)"
                ),
            },
        ));
    }
    let cannot_deliver: Vec<String> = running
        .iter()
        .filter_map(|n| {
            let why = components.speakers.get(*n)?.kube_proxy_failing.as_ref()?;
            Some(format!("{n} (kube-proxy fails its health check: {why})"))
        })
        .collect();
    if !cannot_deliver.is_empty() {
        d.evidence.push(if cannot_deliver.len() == running.len() {
            format!(
                "kube-proxy fails on every node that may announce it, so the check is ignored and traffic may go nowhere: {}",
                cannot_deliver.join("; ")
            )
        } else {
            format!(
                "passed over while another node can deliver: {}",
                cannot_deliver.join("; ")
            )
        });
    }
    let type_ = report::condition_type(ip);
    let condition = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.message.starts_with(&format!("{ip} ")));
    match condition {
        Some(c) if c.reason == report::REASON_CONFLICT => {
            d.evidence.push(format!("condition {type_}: {}", c.message));
            // The other host is a node of ours whose own kernel answers ARP for VIPs.
            let kernels: Vec<(&String, &String)> = components
                .speakers
                .iter()
                .filter(|(n, _)| c.message.contains(&format!("(node {n})")))
                .filter_map(|(n, s)| Some((n, s.kernel_answers_arp.as_ref()?)))
                .collect();
            if !kernels.is_empty() {
                for (node, said) in &kernels {
                    d.evidence.push(format!("{node}: {said}"));
                }
                let names: Vec<&str> = kernels.iter().map(|(n, _)| n.as_str()).collect();
                return Err(stop(
                    d,
                    format!(
                        "the kernels of {} answer ARP for {ip} too: kube-proxy in IPVS mode without strictARP",
                        names.join(", ")
                    ),
                    "set ipvs.strictARP: true in kube-proxy's configuration (kubectl -n kube-system edit configmap kube-proxy) \
                     and restart kube-proxy, or set net.ipv4.conf.all.arp_ignore=1 and arp_announce=2 on the nodes",
                ));
            }
            Err(stop(
                d,
                if c.status == "True" {
                    format!("two hosts answer for {ip}: {}", c.message)
                } else {
                    format!("another host answers for {ip}, not ferrolb: {}", c.message)
                },
                &format!(
                    "find the host with that MAC (`ip neigh show {ip}` on a machine of the segment, your switch's MAC table): \
                     another load balancer's speaker still running (kubectl get pods -A | grep -i -e metallb -e kube-vip), \
                     or a host configured with the IP; once it stops answering, ferrolb takes the IP within seconds. \
                     To keep ferrolb off the IP instead, remove it from the pool"
                ),
            ))
        }
        Some(c) if c.status == "True" => {
            d.evidence.push(format!("condition {type_}: {}", c.message));
            // Which node it names, asked of the rule that words it, not read from the text.
            match eligible.iter().find(|n| report::reports(c, ip, n)) {
                Some(node) => Ok((node.clone(), forwards)),
                None => Err(stop(
                    d,
                    format!(
                        "{ip} is reported announced ({}), but by none of the nodes that may announce it now ({})",
                        c.message,
                        eligible.join(", ")
                    ),
                    &format!(
                        "kubectl -n {ns} logs -l app.kubernetes.io/component=speaker (a speaker cut off from the API server reports late)"
                    ),
                )),
            }
        }
        Some(c) => Err(stop(
            d,
            format!("nobody answers for {ip}: {}", c.message),
            "see the speakers' logs",
        )),
        None => Err(stop(
            d,
            format!(
                "{ip} is assigned and may be announced by {}, but no speaker has reported announcing it",
                eligible.join(", ")
            ),
            &format!(
                "kubectl -n {ns} logs -l app.kubernetes.io/component=speaker (does the node have an interface on the IP's subnet?)"
            ),
        )),
    }
}

/// Where the traffic goes once it reaches the announcing node.
fn traffic(
    f: &Facts,
    svc: &Service,
    owner: Option<&str>,
    ips: &[IpAddr],
    forwarding: bool,
    d: &mut Diagnosis,
) -> Result<(), Box<Diagnosis>> {
    let stop =
        |d: &Diagnosis, headline: String, next: &str| Box::new(d.clone().stop(headline, next));
    let m = &f.manifests;
    let spec = svc.spec.clone().unwrap_or_default();
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let at = match owner {
        Some(node) => format!("{} is announced by {node}", list(ips)),
        None => format!("{} is announced", list(ips)),
    };
    if forwarding {
        let without: Vec<String> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.node_port.is_none())
            .map(|p| p.port.to_string())
            .collect();
        if !without.is_empty() {
            return Err(stop(
                d,
                format!(
                    "{at}, but forwarding: nodePort has no NodePort to send port {} to",
                    without.join(", ")
                ),
                "remove spec.allocateLoadBalancerNodePorts: false, or use forwarding: none with a kube-proxy that handles LoadBalancer IPs",
            ));
        }
    }
    // What kube-proxy sends traffic to: the ready endpoints of the EndpointSlices.
    let slices: Vec<&EndpointSlice> = m.endpoint_slices.iter().map(|s| &*s.object).collect();
    let endpoints: Vec<&Endpoint> = announcements::ready_endpoints(&slices, svc).collect();
    let selector = spec.selector.clone().filter(|s| !s.is_empty());
    let text = selector
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    // The Pods only explain missing endpoints, and the ports they expose.
    let pods: Vec<&Pod> = match &selector {
        None => Vec::new(),
        Some(selector) => m
            .pods
            .iter()
            .map(|p| &*p.object)
            .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect(),
    };
    if endpoints.is_empty() {
        let Some(_) = selector else {
            d.evidence
                .push("no selector and no ready endpoint in an EndpointSlice: its endpoints are managed by hand".into());
            return Ok(());
        };
        if pods.is_empty() {
            return Err(stop(
                d,
                format!("{at}, but the selector {text} matches no Pod in namespace {namespace}"),
                &format!(
                    "kubectl get pods -n {namespace} --show-labels (compare with the Service's spec.selector)"
                ),
            ));
        }
        let ready = pods.iter().filter(|p| pod_ready(p)).count();
        // Files written by hand hold no EndpointSlices: in a cluster, the EndpointSlice
        // controller makes them from the ready Pods.
        let sliced = slices.iter().any(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(announcements::SERVICE_NAME_LABEL))
                    == svc.metadata.name.as_ref()
        });
        if ready > 0 && f.components.is_none() && !sliced {
            let names: Vec<String> = pods
                .iter()
                .filter(|p| pod_ready(p))
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            d.evidence.push(format!(
                "ready Pods (the files hold no EndpointSlice; a cluster makes them from these): {}",
                names.join(", ")
            ));
            return check_ports(&spec, &pods, &at, d);
        }
        return Err(stop(
            d,
            if ready == 0 {
                format!(
                    "{at}, but none of the {} Pods matching {text} is Ready",
                    pods.len()
                )
            } else {
                format!(
                    "{at}, but no EndpointSlice lists a ready endpoint, though {ready} of the {} Pods matching {text} are Ready",
                    pods.len()
                )
            },
            &if ready == 0 {
                format!(
                    "kubectl describe pods -n {namespace} -l {text} (readiness probes, crashes, scheduling)"
                )
            } else {
                format!(
                    "kubectl get endpointslices -n {namespace} -l kubernetes.io/service-name={} -o yaml (is kube-controller-manager running?)",
                    svc.metadata.name.as_deref().unwrap_or_default()
                )
            },
        ));
    }
    check_ports(&spec, &pods, &at, d)?;
    let names: Vec<String> = endpoints
        .iter()
        .map(|e| {
            e.target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_else(|| e.addresses.join(","))
        })
        .collect();
    d.evidence
        .push(format!("ready endpoints: {}", names.join(", ")));
    Ok(())
}

/// Whether each port's targetPort is one the Pods expose (when they declare ports).
fn check_ports(
    spec: &ServiceSpec,
    pods: &[&Pod],
    at: &str,
    d: &mut Diagnosis,
) -> Result<(), Box<Diagnosis>> {
    let stop =
        |d: &Diagnosis, headline: String, next: &str| Box::new(d.clone().stop(headline, next));
    for port in spec.ports.iter().flatten() {
        let exposed = |target: &IntOrString| {
            pods.iter().any(|p| {
                p.spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|cp| match target {
                        IntOrString::Int(n) => cp.container_port == *n,
                        IntOrString::String(name) => cp.name.as_deref() == Some(name.as_str()),
                    })
            })
        };
        let target = port
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port.port));
        let declares_ports = pods.iter().any(|p| {
            p.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .any(|c| c.ports.as_ref().is_some_and(|v| !v.is_empty()))
        });
        if declares_ports && !exposed(&target) {
            let target_text = match &target {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            let theirs: std::collections::BTreeSet<String> = pods
                .iter()
                .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
                .flat_map(|c| c.ports.iter().flatten())
                .map(|cp| match &cp.name {
                    Some(n) => format!("{} ({n})", cp.container_port),
                    None => cp.container_port.to_string(),
                })
                .collect();
            return Err(stop(
                d,
                format!(
                    "{at}, but targetPort {target_text} of port {} is not a port the Pods expose ({})",
                    port.port,
                    theirs.into_iter().collect::<Vec<_>>().join(", ")
                ),
                "set the Service's targetPort to the port the container listens on",
            ));
        }
    }
    Ok(())
}

/// The pools as the allocator and the speakers see them.
fn pool_configs(m: &Manifests) -> Vec<ferrolb_allocator::PoolConfig> {
    let pools: Vec<_> = m.pools.iter().map(|p| (*p.object).clone()).collect();
    input::pool_configs(&pools).0
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
