//! The CustomResourceDefinitions, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{IPAddressPool, L2Advertisement};

/// Every CRD ferrolb installs, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![IPAddressPool::crd(), L2Advertisement::crd()]
}
