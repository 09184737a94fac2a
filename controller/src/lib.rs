//! ferrolb's controller: the IP allocator (pure) and the translation of Kubernetes
//! objects into its input. The reconciler that watches the API server builds on these.

pub mod allocator;
pub mod input;
