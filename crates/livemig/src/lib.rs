//! The parts of the `livemig` command line that other programs use too: the control
//! socket's requests and client, and the transport options. The fuzzer feeds
//! [`control::Request::parse`] (`fuzz/`).

#![forbid(unsafe_code)]

pub mod control;
pub mod security;
