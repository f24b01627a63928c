//! The Sandfork operator: a Sandbox controller that runs each sandbox in a
//! Pod of its own, placed by the scheduler (or claimed from a warm pool), and
//! has the agent of the Pod's node start the VM in it; a SandboxBranch
//! controller that captures a running Sandbox and starts branches from the
//! capture; and a SandboxWarmPool controller that keeps empty sandbox Pods
//! started on each node.
#![forbid(unsafe_code)]

pub mod agents;
pub mod branch;
pub mod client;
pub mod context;
pub mod controller;
pub mod error;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod run;
pub mod sandbox;
pub mod warmpool;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;
