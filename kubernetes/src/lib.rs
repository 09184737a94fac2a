//! The Kubernetes edge ferrolb's controller and speaker share: the client, found as
//! kubectl finds it; Events; the small HTTP server for metrics and health.

pub mod client;
pub mod events;
pub mod http;
