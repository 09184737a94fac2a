//! Multi-document YAML manifests (what `kubectl apply -f` takes) to typed objects, for
//! `ferrolb plan` and the speaker's standalone mode. Text in, objects out: reading the
//! files is the caller's job.
//!
//! Every error names the file, the document's position in it and, when it has one, the
//! object's kind and name, with the path of the offending field.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{IPAddressPool, L2Advertisement};

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// 1-based, counting non-empty documents (and items of a `List`).
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, document {}", self.file, self.document)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Located<T> {
    pub origin: Origin,
    pub object: T,
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
}

impl Manifests {
    /// Adds every document of one file. Returns the documents that could not be read;
    /// the others are added regardless.
    pub fn add_text(&mut self, file: &str, text: &str) -> Vec<ManifestError> {
        let documents: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(docs) => docs,
            Err(e) => {
                return vec![ManifestError {
                    origin: Origin {
                        file: file.to_string(),
                        document: 0,
                    },
                    object: String::new(),
                    message: format!("not valid YAML: {e}"),
                }];
            }
        };
        let mut items = Vec::new();
        for doc in documents.into_iter().filter(|d| !d.is_null()) {
            // `kubectl get -o yaml` wraps objects in a List.
            if doc.get("kind").and_then(Value::as_str) == Some("List") {
                items.extend(
                    doc.get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                );
            } else {
                items.push(doc);
            }
        }
        let mut errors = Vec::new();
        for (i, doc) in items.into_iter().enumerate() {
            let origin = Origin {
                file: file.to_string(),
                document: i + 1,
            };
            if let Err(e) = self.add_document(origin, doc) {
                errors.push(e);
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
                push(&mut self.pools, origin, doc).map_err(fail)
            }
            ("ferrolb.io/v1beta1", "L2Advertisement") => {
                push(&mut self.l2_advertisements, origin, doc).map_err(fail)
            }
            ("v1", "Service") => push(&mut self.services, origin, doc).map_err(fail),
            ("v1", "Namespace") => push(&mut self.namespaces, origin, doc).map_err(fail),
            ("v1", "Node") => push(&mut self.nodes, origin, doc).map_err(fail),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                push(&mut self.endpoint_slices, origin, doc).map_err(fail)
            }
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

fn push<T: DeserializeOwned>(
    into: &mut Vec<Located<T>>,
    origin: Origin,
    doc: Value,
) -> Result<(), String> {
    let object: T = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    into.push(Located { origin, object });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(m.services[0].origin.to_string(), "lab.yaml, document 2");
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.warnings,
            vec![
                "lab.yaml, document 4 (Deployment \"web\"): skipped: ferrolb does not read apps/v1 Deployment"
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

    #[test]
    fn syntax_errors_and_missing_names_are_reported() {
        let mut m = Manifests::default();
        let errors = m.add_text("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: [\n");
        assert!(
            errors[0]
                .to_string()
                .starts_with("x.yaml, document 0: not valid YAML"),
            "{}",
            errors[0]
        );
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
