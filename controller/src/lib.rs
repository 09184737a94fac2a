//! ferrolb's controller: the IP allocator (pure), the translation of Kubernetes objects
//! into its input (pure), the reconciler that decides what to write (pure), and the
//! Kubernetes edge that watches, elects a leader and writes.

pub mod allocator;
pub mod input;
pub mod kubernetes;
pub mod reconcile;
