//! Integration tests: the real `ci-runner` binary against the fake GitHub API and the fake
//! runner (tests/fakes), as a real PID 1 in a new PID namespace, and as a port forwarder.

mod app;
mod autoscale;
mod config;
mod controller;
mod credentials;
mod deploy;
mod docker;
mod drain;
mod ephemeral;
mod faults;
mod fleet;
mod forward;
mod harness;
mod hooks;
mod lock;
mod metrics;
mod multi;
mod pid1;
mod prewarm;
mod scenarios;
mod store;
mod update;
