//! ferrolb's controller: the reconciler that decides what to write (pure) over the
//! allocator of `ferrolb-allocator`, and the Kubernetes edge that watches, elects a leader
//! and writes.

pub mod kubernetes;
pub mod reconcile;
