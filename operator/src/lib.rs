//! The Sandfork operator: a Sandbox controller that runs each sandbox in a
//! Pod of its own, placed by the scheduler, and has the agent of the Pod's
//! node start the VM in it, and a SandboxBranch controller
//! that captures a running Sandbox and starts branches from the capture.
#![forbid(unsafe_code)]

pub mod agents;
pub mod branch;
pub mod client;
pub mod context;
pub mod controller;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod run;
pub mod sandbox;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;
