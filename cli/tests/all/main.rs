//! The CLI's process-level tests: the `capsule` binary (and the hub, nodes, browsers and
//! containers it drives) end to end. One test binary, so that the build links the
//! workspace's dependencies once for all of them; each module is one area, and
//! `cargo test -p capsule --test all AREA::` runs one (for example `hub::` or `faults::`).

mod common;

mod browser;
mod browser_example;
mod cli;
mod container;
mod deploy;
mod faults;
mod hostile;
mod hub;
mod logs;
mod monitoring;
mod release;
mod snippets;
mod update_attacks;
