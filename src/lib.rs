//! The `ferrolb` package's library half: what the binary and the end-to-end tests share.

pub mod lab;
pub mod lab_command;
