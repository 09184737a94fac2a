//! Multi-document YAML manifests (what `kubectl apply -f` takes) to typed objects, for
//! `ferrolb plan` and the speaker's standalone mode. Text in, objects out: reading the
//! files is the caller's job.
//!
//! Every error names the file, the document's position in it and, when it has one, the
//! object's kind and name, with the path of the offending field.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{IPAddressPool, L2Advertisement, validation};

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Borrowed for objects from the API server: tens of thousands of them are located
    /// after every change, and none needs a copy of "cluster".
    pub file: Cow<'static, str>,
    /// 1-based, counting the file's non-empty documents.
    pub document: usize,
    /// 0-based position in the document's `items` when it is a `List`.
    pub item: Option<usize>,
}

impl Origin {
    /// An object read from the API server rather than a file.
    pub fn cluster() -> Origin {
        Origin {
            file: Cow::Borrowed("cluster"),
            document: 0,
            item: None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            return f.write_str(&self.file);
        }
        write!(f, "{}, document {}", self.file, self.document)?;
        match self.item {
            Some(i) => write!(f, ", items[{i}]"),
            None => Ok(()),
        }
    }
}

/// An object and where it came from. The object is shared: a speaker rebuilds its
/// snapshot of the cluster after every burst of changes, and copying 10,000 Services
/// each time cost more than everything else it does.
#[derive(Clone, Debug, PartialEq)]
pub struct Located<T> {
    pub origin: Origin,
    pub object: Arc<T>,
}

impl<T> Located<T> {
    pub fn new(origin: Origin, object: T) -> Self {
        Located {
            origin,
            object: Arc::new(object),
        }
    }

    /// Objects read from the API server.
    pub fn in_cluster(items: Vec<T>) -> Vec<Located<T>> {
        items
            .into_iter()
            .map(|object| Located::new(Origin::cluster(), object))
            .collect()
    }
}

/// The objects ferrolb reads, each with where it came from.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub pools: Vec<Located<IPAddressPool>>,
    pub l2_advertisements: Vec<Located<L2Advertisement>>,
    pub services: Vec<Located<Service>>,
    pub namespaces: Vec<Located<Namespace>>,
    pub nodes: Vec<Located<Node>>,
    pub endpoint_slices: Vec<Located<EndpointSlice>>,
    /// Read for `ferrolb why` (whether a Service's selector finds ready Pods).
    pub pods: Vec<Located<Pod>>,
    /// Documents skipped on purpose (kinds ferrolb does not read), one line each.
    pub warnings: Vec<String>,
}

/// A document that could not be read; the message says where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}{object}: {message}")]
pub struct ManifestError {
    pub origin: Origin,
    /// ` (Kind "name")` when known, else empty.
    pub object: String,
    pub message: String,
    /// The document is not YAML at all (a syntax error or a reader limit), so nothing
    /// of it was read; otherwise one object of it was refused.
    pub unparsable: bool,
}

impl Manifests {
    /// Adds every document of one file. Returns the documents that could not be read;
    /// the others are added regardless.
    pub fn add_text(&mut self, file: &str, text: &str) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let mut document = 0;
        for (line, chunk) in split_documents(text) {
            let values = match parse_chunk(chunk) {
                Ok(values) => values,
                Err(e) => {
                    document += 1;
                    errors.push(ManifestError {
                        origin: Origin {
                            file: file.to_string().into(),
                            document,
                            item: None,
                        },
                        object: String::new(),
                        message: yaml_error(&e, file, line),
                        unparsable: true,
                    });
                    continue;
                }
            };
            for doc in values.into_iter().filter(|d| !d.is_null()) {
                document += 1;
                let origin = |item| Origin {
                    file: file.to_string().into(),
                    document,
                    item,
                };
                // `kubectl get -o yaml` wraps objects in a List.
                if doc.get("kind").and_then(Value::as_str) == Some("List") {
                    let items = doc.get("items").and_then(Value::as_array).cloned();
                    for (i, item) in items.unwrap_or_default().into_iter().enumerate() {
                        errors.extend(self.add_document(origin(Some(i)), item).err());
                    }
                } else {
                    errors.extend(self.add_document(origin(None), doc).err());
                }
            }
        }
        errors
    }

    fn add_document(&mut self, origin: Origin, doc: Value) -> Result<(), ManifestError> {
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let object = match &name {
            Some(n) if !kind.is_empty() => format!(" ({kind} {n:?})"),
            _ if !kind.is_empty() => format!(" ({kind})"),
            _ => String::new(),
        };
        let at = origin.clone();
        let fail = |message: String| ManifestError {
            origin: at.clone(),
            object: object.clone(),
            message,
            unparsable: false,
        };
        if !doc.is_object() {
            return Err(fail(
                "not a Kubernetes object (expected a mapping with apiVersion and kind)".into(),
            ));
        }
        if kind.is_empty() || api_version.is_empty() {
            return Err(fail("apiVersion and kind are required".into()));
        }
        if name.as_deref().is_none_or(str::is_empty) {
            return Err(fail("metadata.name is required".into()));
        }
        match (api_version.as_str(), kind.as_str()) {
            ("ferrolb.io/v1beta1", "IPAddressPool") => {
                push_checked(&mut self.pools, origin, doc, validation::pool_repeats).map_err(fail)
            }
            ("ferrolb.io/v1beta1", "L2Advertisement") => push_checked(
                &mut self.l2_advertisements,
                origin,
                doc,
                validation::advertisement_problem,
            )
            .map_err(fail),
            ("v1", "Service") => push(&mut self.services, origin, doc).map_err(fail),
            ("v1", "Namespace") => push(&mut self.namespaces, origin, doc).map_err(fail),
            ("v1", "Node") => push(&mut self.nodes, origin, doc).map_err(fail),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                push(&mut self.endpoint_slices, origin, doc).map_err(fail)
            }
            ("v1", "Pod") => push(&mut self.pods, origin, doc).map_err(fail),
            (group, "IPAddressPool" | "L2Advertisement") if group.starts_with("metallb.io/") => {
                Err(fail(format!(
                    "apiVersion {group} is MetalLB's; change it to ferrolb.io/v1beta1 (the fields are the same)"
                )))
            }
            _ => {
                self.warnings.push(format!(
                    "{origin}{object}: skipped: ferrolb does not read {api_version} {kind}"
                ));
                Ok(())
            }
        }
    }
}

/// The documents of a YAML stream, each with the number of lines before it, cut where
/// YAML itself cuts them: at a line starting with `---` or after one starting with
/// `...` (such lines always end a document, even inside a block scalar). Each is parsed
/// on its own, so an error names its document, the documents around it are still read,
/// and no limit on the number of documents applies.
/// Every document of a YAML text, as values (a `List` is one document), read with the
/// limits [`Manifests::add_text`] has; for callers that read kinds ferrolb does not own.
/// The error names the file and line of the first document that is not YAML.
pub fn documents(file: &str, text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (line, chunk) in split_documents(text) {
        let values = parse_chunk(chunk).map_err(|e| yaml_error(&e, file, line))?;
        out.extend(values.into_iter().filter(|d| !d.is_null()));
    }
    Ok(out)
}

fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    let mut chunks = Vec::new();
    let (mut start, mut start_line) = (0, 0);
    // Whether the chunk so far holds more than blank lines, comments and directives
    // (which belong to the document that follows them).
    let mut substance = false;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if marker(bare, "---") && substance {
            chunks.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, n);
        }
        offset += line.len();
        let trimmed = bare.trim_start();
        if marker(bare, "...") {
            chunks.push((start_line, &text[start..offset]));
            (start, start_line, substance) = (offset, n + 1, false);
        } else if !(trimmed.is_empty() || trimmed.starts_with('#') || bare.starts_with('%')) {
            substance = true;
        }
    }
    if start < text.len() {
        chunks.push((start_line, &text[start..]));
    }
    chunks
}

/// One chunk of [`split_documents`]: its limits grow with its size, so that a large
/// object (a `List` of thousands of Services) reads, while depth and alias expansion,
/// the ways a small text becomes huge, stay capped.
fn parse_chunk(chunk: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    let default = serde_saphyr::Budget::default();
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: default.max_nodes.max(chunk.len().saturating_mul(2)),
            max_events: default.max_events.max(chunk.len().saturating_mul(4)),
            max_total_scalar_bytes: default.max_total_scalar_bytes.max(chunk.len()),
        },
    };
    serde_saphyr::from_multiple_with_options(chunk, options)
}

/// A YAML error as a sentence with the line in the file, then the parser's snippet
/// labelled with the file's name.
fn yaml_error(e: &serde_saphyr::Error, file: &str, lines_before: usize) -> String {
    let inner = e.without_snippet();
    let at = inner
        .location()
        .map(|l| (l.line() + lines_before as u64, l.column()));
    let what = match inner {
        // The snippet would show the parser's own words for the limit: leave it out.
        serde_saphyr::Error::Budget { breach, .. } => {
            let at = at.map(|(l, c)| format!(" (line {l}, column {c})"));
            return format!("{}{}", budget_message(breach), at.unwrap_or_default());
        }
        other => {
            let text = other.to_string();
            let suffix = other
                .location()
                .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
                .unwrap_or_default();
            format!(
                "not valid YAML: {}",
                text.strip_suffix(&suffix).unwrap_or(&text)
            )
        }
    };
    let Some((line, column)) = at else {
        return what;
    };
    let snippet = e.render_with_options(serde_saphyr::render_options! {
        line_offset: lines_before as u64,
        source_name: Some(file),
    });
    // The snippet's first line repeats the message; keep the picture under it.
    let picture = snippet.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
    if picture.trim().is_empty() {
        format!("{what} (line {line}, column {column})")
    } else {
        format!(
            "{what} (line {line}, column {column})\n{}",
            picture.trim_end()
        )
    }
}

/// Which reader limit a document hit, and what to do about it.
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Depth { .. } => {
            let max = serde_saphyr::Budget::default().max_depth;
            format!(
                "nests lists and mappings deeper than {max} levels, the most ferrolb reads; \
                 Kubernetes objects never need that many"
            )
        }
        B::Aliases { .. } | B::Anchors { .. } | B::AliasAnchorRatio { .. } => {
            "uses more YAML anchors and aliases than ferrolb expands (a guard against \
             alias bombs); write the repeated values out"
                .to_string()
        }
        _ => "is larger than the YAML reader accepts in one document; split it into several \
              documents (separated by ---) or files"
            .to_string(),
    }
}

fn push<T: DeserializeOwned>(
    into: &mut Vec<Located<T>>,
    origin: Origin,
    doc: Value,
) -> Result<(), String> {
    push_checked(into, origin, doc, |_| None)
}

/// [`push`], refusing an object that `refused` has something against (what the API
/// server's schema would refuse but serde cannot see).
fn push_checked<T: DeserializeOwned>(
    into: &mut Vec<Located<T>>,
    origin: Origin,
    doc: Value,
    refused: impl Fn(&T) -> Option<String>,
) -> Result<(), String> {
    let object: T = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    if let Some(problem) = refused(&object) {
        return Err(problem);
    }
    into.push(Located::new(origin, object));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API server refuses (a list declared a set with a repeat) is refused from
    /// files too, naming the object and the field; the other documents are still read.
    #[test]
    fn repeats_the_api_server_refuses_are_refused_with_the_field() {
        let mut m = Manifests::default();
        let errors = m.add_text(
            "pools.yaml",
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: shop}\n\
             spec: {addresses: [192.0.2.0/28], serviceAllocation: {namespaces: [shop, blog, shop]}}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: l2}\n\
             spec: {nodeSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: b}}]}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: blog}\n\
             spec: {addresses: [192.0.2.16/28], serviceAllocation: {namespaces: [blog]}}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: fast}\n\
             spec: {gratuitous: {count: 3, intervalMilliseconds: 2}}\n",
        );
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "pools.yaml, document 1 (IPAddressPool \"shop\"): spec.serviceAllocation.namespaces[2] \"shop\" repeats namespaces[0]; the API server refuses a list with repeats: remove one",
                "pools.yaml, document 2 (L2Advertisement \"l2\"): spec.nodeSelectors[1] repeats nodeSelectors[0]; the API server refuses a list with repeats: remove one",
                "pools.yaml, document 4 (L2Advertisement \"fast\"): spec.gratuitous.intervalMilliseconds 2 is out of 10..=60000",
            ]
        );
        assert_eq!(m.pools.len(), 1);
    }

    #[test]
    fn reads_several_kinds_and_lists() {
        let mut m = Manifests::default();
        let errors = m.add_text(
            "lab.yaml",
            r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab}
spec: {addresses: ["192.0.2.0/24"]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec: {type: LoadBalancer, ports: [{port: 80}]}
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop, labels: {team: blue}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#,
        );
        assert_eq!(errors, vec![]);
        assert_eq!(m.pools[0].object.spec.addresses[0].0, "192.0.2.0/24");
        assert_eq!(
            m.services[0].origin.to_string(),
            "lab.yaml, document 2, items[0]"
        );
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.warnings,
            vec![
                "lab.yaml, document 3 (Deployment \"web\"): skipped: ferrolb does not read apps/v1 Deployment"
            ]
        );
    }

    #[test]
    fn a_bad_document_is_named_and_the_others_are_kept() {
        let mut m = Manifests::default();
        let errors = m.add_text(
            "pools.yaml",
            r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: broken}
spec: {addresses: ["192.0.2.0/24"], autoAssign: "maybe"}
---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: fine}
spec: {addresses: ["198.51.100.0/24"]}
"#,
        );
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.starts_with(
                "pools.yaml, document 1 (IPAddressPool \"broken\"): spec.autoAssign: invalid type"
            ),
            "{msg}"
        );
        assert_eq!(m.pools.len(), 1);
    }

    fn service(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n")
    }

    #[test]
    fn a_syntax_error_names_its_document_and_line_and_the_others_are_read() {
        let mut m = Manifests::default();
        let text = format!(
            "# services\n---\n{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: [\n---\n{}",
            service("a"),
            service("b"),
            service("d")
        );
        let errors = m.add_text("svc.yaml", &text);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].unparsable);
        let msg = errors[0].to_string();
        let first = msg.lines().next().unwrap();
        assert_eq!(
            first,
            "svc.yaml, document 3: not valid YAML: unclosed bracket '[' (line 13, column 11)"
        );
        assert!(msg.contains("--> svc.yaml:13:11"), "{msg}");
        assert!(!msg.contains("error:") && !msg.contains("<input>"), "{msg}");
        let names: Vec<_> = m
            .services
            .iter()
            .map(|s| s.object.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "d"]);
        assert_eq!(m.services[2].origin.document, 4);
    }

    #[test]
    fn more_than_a_thousand_documents_are_read() {
        let text: String = (0..1100)
            .map(|i| format!("---\n{}", service(&format!("s{i}"))))
            .collect();
        let mut m = Manifests::default();
        assert_eq!(m.add_text("many.yaml", &text), vec![]);
        assert_eq!(m.services.len(), 1100);
        assert_eq!(
            m.services[1099].origin.to_string(),
            "many.yaml, document 1100"
        );
    }

    #[test]
    fn a_list_larger_than_the_readers_default_budget_is_read() {
        // 260,000 nodes in one document, past the parser's default of 250,000.
        let items: String = (0..20_000)
            .map(|i| format!("- {{apiVersion: v1, kind: Service, metadata: {{name: s{i}, labels: {{a: b}}}}}}\n"))
            .collect();
        let mut m = Manifests::default();
        let errors = m.add_text(
            "list.yaml",
            &format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
        );
        assert_eq!(errors, vec![]);
        assert_eq!(m.services.len(), 20_000);
    }

    #[test]
    fn reader_limits_are_explained_in_words() {
        let mut m = Manifests::default();
        let deep = format!("{}1\n", "- ".repeat(100));
        let errors = m.add_text("deep.yaml", &format!("{}---\n{deep}", service("a")));
        let msg = errors[0].to_string();
        assert!(
            msg.starts_with(
                "deep.yaml, document 2: nests lists and mappings deeper than 64 levels"
            ),
            "{msg}"
        );
        assert!(!msg.contains("Depth {"), "{msg}");
        assert_eq!(m.services.len(), 1);
    }

    #[test]
    fn directives_and_document_end_markers_are_yaml() {
        let mut m = Manifests::default();
        let text = format!(
            "%YAML 1.2\n---\n{}...\n%YAML 1.2\n--- {{apiVersion: v1, kind: Service, metadata: {{name: b}}}}\n",
            service("a")
        );
        assert_eq!(m.add_text("d.yaml", &text), vec![]);
        assert_eq!(m.services.len(), 2);
        assert_eq!(m.services[1].origin.document, 2);
    }

    #[test]
    fn missing_names_are_reported() {
        let mut m = Manifests::default();
        let errors = m.add_text("y.yaml", "apiVersion: v1\nkind: Service\nmetadata: {}\n");
        assert_eq!(
            errors[0].to_string(),
            "y.yaml, document 1 (Service): metadata.name is required"
        );
    }

    #[test]
    fn metallb_kinds_get_a_hint() {
        let mut m = Manifests::default();
        let errors = m.add_text(
            "old.yaml",
            "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p}\nspec: {addresses: [10.0.0.0/24]}\n",
        );
        assert!(
            errors[0]
                .message
                .contains("change it to ferrolb.io/v1beta1"),
            "{}",
            errors[0]
        );
    }
}
