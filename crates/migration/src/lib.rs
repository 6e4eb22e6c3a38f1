//! The migration engine: the wire protocol (`frame`, `msg`, `pages`; documented in
//! `docs/protocol.md`), the source engine with QEMU's convergence and a switchover that
//! commits before the destination may run the guest, the destination, device-write tracking in
//! three modes, verification (gate or audit), and the transports (`transport`: plain TCP, TLS,
//! a pre-shared key; documented in `docs/transport.md`).
//!
//! It owns nothing of the VM, the devices or the IOMMU: it drives `vmm::Vm`, the `vfio`
//! VMM-side sequence and the iommufd/DMA-logging uAPIs.

#![forbid(unsafe_code)]

pub mod control;
pub mod convergence;
pub mod destination;
pub mod digest;
pub mod dirty_source;
pub mod error;
pub mod frame;
pub mod info;
pub mod msg;
pub mod pages;
pub mod progress;
pub mod sender;
pub mod session;
pub mod source;
pub mod throttle;
pub mod transport;

pub use control::{CancelError, MigrationControl};
pub use destination::{receive, DestOptions, DestReport, Incoming, OnRunning};
pub use dirty_source::DeviceTracking;
pub use error::{MigError, WireError};
pub use info::{DestState, MigrationInfo, Outcome, Status};
pub use msg::VerifyMode;
pub use source::{held_advice, migrate, Sabotage, SourceOptions};
pub use transport::{Conn, Psk, Security, TlsCreds};
