//! Fault injection for livemig's migration protocol, as a test utility: a TCP proxy that
//! damages the stream at a chosen protocol step (`proxy`), and the matrix of such faults run
//! against real migrations with the checks every case must pass (`matrix`). `livemig faults`
//! runs it and prints the table; CI runs every cell once. And a forger (`forge`) that rewrites
//! the stream without holding any key, which a pre-shared key or TLS must stop. And a relay
//! that adds latency, jitter, stalls and cuts to a link (`impair`), where `netem` is missing.

#![forbid(unsafe_code)]

pub mod forge;
pub mod impair;
pub mod matrix;
pub mod proxy;

pub use forge::{Forged, Forger, Forgery};
pub use impair::{ImpairedLink, Impairment};
pub use matrix::{run_case, run_matrix, Case, Config};
pub use proxy::{Action, Dir, Fault, Fired, Proxy, Step};
