//! The CustomResourceDefinitions, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{IPAddressPool, L2Advertisement, NodeAnnouncement};

/// Every CRD ferrolb installs, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        IPAddressPool::crd(),
        L2Advertisement::crd(),
        NodeAnnouncement::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formats kube-apiserver knows (apiextensions-apiserver's supported formats,
    /// and int32/int64/float/double for numbers); any other makes it warn on every
    /// apply ("unrecognized format").
    const KNOWN: &[&str] = &[
        "bsonobjectid",
        "uri",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "isbn",
        "isbn10",
        "isbn13",
        "creditcard",
        "ssn",
        "hexcolor",
        "rgbcolor",
        "byte",
        "password",
        "date",
        "duration",
        "datetime",
        "date-time",
        "int32",
        "int64",
        "float",
        "double",
    ];

    fn formats(value: &serde_json::Value, at: String, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("format", serde_json::Value::String(f)) => {
                            out.push((at.clone(), f.clone()))
                        }
                        _ => formats(v, format!("{at}.{k}"), out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    formats(v, format!("{at}[{i}]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_format_is_one_the_api_server_knows() {
        let mut found = Vec::new();
        for crd in all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            formats(&serde_json::to_value(&crd).unwrap(), name, &mut found);
        }
        let unknown: Vec<_> = found
            .iter()
            .filter(|(_, f)| !KNOWN.contains(&f.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "formats the API server warns about: {unknown:?}"
        );
        // The walk does see formats (the counts are int64).
        assert!(
            found
                .iter()
                .any(|(at, f)| at.ends_with("assignedIPv4") && f == "int64"),
            "{found:?}"
        );
    }
}
