//! The Kubernetes edge ferrolb's controller and speaker share: the client, found as
//! kubectl finds it; API errors sorted into what to do about them; the one retry policy;
//! Events; the small HTTP server for metrics and health.

pub mod client;
pub mod error;
pub mod events;
pub mod http;
pub mod lease;
pub mod retry;
