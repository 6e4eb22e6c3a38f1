//! Migration states and feature flags, with Linux's numbers (include/uapi/linux/vfio.h).

use std::fmt;

/// `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, by number.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    pub fn from_u32(v: u32) -> Option<MigState> {
        MigState::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// States in which a save stream is open.
    pub fn is_precopy(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p)
    }

    /// States that have an open data stream.
    pub fn has_stream(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy | MigState::Resuming
        )
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `VFIO_MIGRATION_*` feature flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MigFlags(pub u64);

impl MigFlags {
    pub const STOP_COPY: MigFlags = MigFlags(1);
    pub const P2P: MigFlags = MigFlags(2);
    pub const PRE_COPY: MigFlags = MigFlags(4);
    /// The combinations Linux defines.
    pub const DEFINED: [MigFlags; 4] = [MigFlags(1), MigFlags(1 | 2), MigFlags(1 | 4), MigFlags(1 | 2 | 4)];

    pub const fn bits(self) -> u64 {
        self.0
    }
    pub const fn contains(self, other: MigFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: MigFlags) -> MigFlags {
        MigFlags(self.0 | other.0)
    }
}

impl std::ops::BitOr for MigFlags {
    type Output = MigFlags;
    fn bitor(self, o: MigFlags) -> MigFlags {
        self.union(o)
    }
}

impl fmt::Display for MigFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (bit, name) in [(1, "STOP_COPY"), (2, "P2P"), (4, "PRE_COPY")] {
            if self.0 & bit != 0 {
                parts.push(name);
            }
        }
        f.write_str(&parts.join("|"))
    }
}
