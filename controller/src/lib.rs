//! ferrolb's controller: the reconciler that decides what to write (pure) over the
//! allocator of `ferrolb-allocator`, the announced condition decided from the nodes'
//! records (pure), and the Kubernetes edge that watches, elects a leader and writes.

pub mod announced;
pub mod kubernetes;
pub mod reconcile;
