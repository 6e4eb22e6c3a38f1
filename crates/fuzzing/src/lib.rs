//! livemig's fuzz targets: each parser of bytes that come from a peer, a file or a user,
//! wrapped as a function of one byte string. A target returns whether the input was accepted
//! (it decoded, and then round-tripped) or refused with an error; it panics only on a bug: a
//! panic in livemig's code, or a decoded value that does not survive its own encoding.
//!
//! The coverage-guided driver is `fuzz/` (AFL++ through cargo-afl); the seed corpora a real
//! migration produces, and every crash's input, are run through these functions by this
//! crate's tests on every CI run. Design and figures: `docs/fuzzing.md`.

#![forbid(unsafe_code)]

mod device;
pub mod host;
mod wire;

/// What a target made of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Decoded (and, where the format has an encoder, round-tripped).
    Accepted,
    /// Refused with an error, as garbage should be.
    Refused,
}

impl From<bool> for Verdict {
    fn from(ok: bool) -> Verdict {
        if ok {
            Verdict::Accepted
        } else {
            Verdict::Refused
        }
    }
}

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub what: &'static str,
    pub run: fn(&[u8]) -> Verdict,
}

/// Every target, in the order `fuzz/run.sh --list` prints them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame-stream",
        what: "the frame reader (header, length bound, CRC, sequence) fed a byte stream in \
               arbitrary read sizes, each frame's payload then decoded as its kind",
        run: wire::frame_stream,
    },
    Target {
        name: "msg",
        what: "each message decoder of msg.rs, and a Pages payload applied to guest memory",
        run: wire::message,
    },
    Target {
        name: "vfio-stream",
        what: "the VFIO stream decoder (vfio::stream), fed in arbitrary chunks",
        run: device::vfio_stream,
    },
    Target {
        name: "accel-resume",
        what: "the accelerator's device-state loader: RESUMING write()s through the real VFIO \
               state machine, then the arc to STOP that loads them",
        run: device::accel_resume,
    },
    Target {
        name: "vcpu-state",
        what: "vmm::state::decode of saved vCPU state",
        run: host::vcpu_state,
    },
    Target {
        name: "control-json",
        what: "a control-socket request line, parsed and checked as `livemig run` does",
        run: host::control_json,
    },
    Target {
        name: "iommufd-ioctl",
        what: "a sequence of raw iommufd ioctl(cmd, bytes) calls on a small live context",
        run: host::iommufd_ioctl,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The input's first byte, which targets use to choose a mode, and the rest.
fn split_first(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) => (b, rest),
        None => (0, data),
    }
}
