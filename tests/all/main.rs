//! One integration-test binary with a module per concern (after wasmtime's `tests/all`).

mod builder;
mod code_once;
mod conformance;
mod copy_on_write;
mod fixtures;
mod host_kernels;
mod independent_calls;
mod limits;
mod malformed_capsules;
mod malformed_requests;
mod node;
mod pipeline;
mod split_form;
