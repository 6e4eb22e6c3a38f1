//! The arc function (Linux: drivers/vfio/vfio_main.c, `vfio_mig_get_next_state`), as a table.

use crate::state::{MigFlags, MigState};
use iommu::errno::{err, EINVAL};
use iommu::Errno;
use MigState::{
    Error as ERR, PreCopy as PC, PreCopyP2p as PCP, Resuming as RES, Running as RUN, RunningP2p as P2P, Stop as STP,
    StopCopy as SC,
};

/// Row and column order of [`FSM_TABLE`], as `docs/vfio.md#arc-table` prints it.
pub const ORDER: [MigState; 8] = [STP, RUN, SC, RES, P2P, PC, PCP, ERR];

/// `vfio_from_fsm_table[cur][new]`: the next single step from `cur` towards `new`.
#[rustfmt::skip]
pub const FSM_TABLE: [[MigState; 8]; 8] = [
    //            STOP  RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P ERROR
    /* STOP */    [STP, P2P,    SC,       RES,     P2P,        P2P,     P2P,         ERR],
    /* RUNNING */ [P2P, RUN,    P2P,      P2P,     P2P,        PC,      P2P,         ERR],
    /* STOP_COPY*/[STP, STP,    SC,       STP,     STP,        ERR,     ERR,         ERR],
    /* RESUMING */[STP, STP,    STP,      RES,     STP,        STP,     STP,         ERR],
    /* R_P2P */   [STP, RUN,    STP,      STP,     P2P,        RUN,     PCP,         ERR],
    /* PRE_COPY */[RUN, RUN,    PCP,      RUN,     RUN,        PC,      PCP,         ERR],
    /* PC_P2P */  [P2P, P2P,    SC,       P2P,     P2P,        PC,      PCP,         ERR],
    /* ERROR */   [ERR, ERR,    ERR,      ERR,     ERR,        ERR,     ERR,         ERR],
];

/// `state_flags_table`: a state is usable iff `(mask & migration_flags) == mask`.
pub fn state_flags(s: MigState) -> u64 {
    const SC_: u64 = MigFlags::STOP_COPY.0;
    const P2P_: u64 = MigFlags::P2P.0;
    const PC_: u64 = MigFlags::PRE_COPY.0;
    match s {
        STP | RUN | SC | RES => SC_,
        P2P => SC_ | P2P_,
        PC => SC_ | PC_,
        PCP => SC_ | P2P_ | PC_,
        ERR => !0,
    }
}

fn pos(s: MigState) -> usize {
    ORDER.iter().position(|&o| o == s).expect("every state is in ORDER")
}

/// One lookup in [`FSM_TABLE`].
pub fn table(cur: MigState, new: MigState) -> MigState {
    FSM_TABLE[pos(cur)][pos(new)]
}

/// Whether `s` exists on a device with `flags`.
pub fn usable(s: MigState, flags: MigFlags) -> bool {
    state_flags(s) & flags.0 == state_flags(s)
}

/// The next single step from `cur` towards `new` on a device with `flags`, skipping states
/// the device does not have. **livemig deviation**: the loop stops at ERROR (the guard a later
/// stable fix added), so STOP_COPY→PRE_COPY(_P2P) fails with `EINVAL` instead of spinning.
pub fn next_state(cur: MigState, new: MigState, flags: MigFlags) -> Result<MigState, Errno> {
    if !usable(cur, flags) {
        return err(EINVAL, "current state not supported by the device");
    }
    if !usable(new, flags) {
        return err(EINVAL, "requested state not supported by the device");
    }
    let mut n = table(cur, new);
    while n != ERR && !usable(n, flags) {
        n = table(n, new);
    }
    if n == ERR {
        return err(EINVAL, "no path to the requested state");
    }
    Ok(n)
}

/// The same for a raw state number (`new >= 8` is `EINVAL`).
pub fn next_state_raw(cur: MigState, new: u32, flags: MigFlags) -> Result<MigState, Errno> {
    match MigState::from_u32(new) {
        Some(n) => next_state(cur, n, flags),
        None => err(EINVAL, "no such state"),
    }
}

/// The single-step arcs a driver with `flags` implements (`docs/vfio.md#driver-arcs`).
pub fn driver_arcs(flags: MigFlags) -> Vec<(MigState, MigState)> {
    let mut v = vec![(RUN, STP), (STP, RUN), (STP, SC), (SC, STP), (STP, RES), (RES, STP)];
    if flags.contains(MigFlags::P2P) {
        v.retain(|a| *a != (RUN, STP) && *a != (STP, RUN));
        v.extend([(RUN, P2P), (P2P, RUN), (P2P, STP), (STP, P2P)]);
    }
    if flags.contains(MigFlags::PRE_COPY) {
        v.extend([(RUN, PC), (PC, RUN)]);
        if flags.contains(MigFlags::P2P) {
            v.extend([(PC, PCP), (PCP, PC), (P2P, PCP), (PCP, P2P), (PCP, SC)]);
        } else {
            v.push((PC, SC));
        }
    }
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_guard() {
        let all = MigFlags(7);
        assert_eq!(next_state(SC, PC, all).unwrap_err(), EINVAL);
        assert_eq!(next_state(SC, PCP, all).unwrap_err(), EINVAL);
        assert_eq!(next_state(RUN, ERR, all).unwrap_err(), EINVAL);
        assert_eq!(next_state(ERR, RUN, all).unwrap_err(), EINVAL);
        assert_eq!(next_state_raw(RUN, 8, all).unwrap_err(), EINVAL);
    }

    #[test]
    fn skips_unusable_states() {
        // Without P2P, RUNNING -> STOP goes straight to STOP.
        assert_eq!(next_state(RUN, STP, MigFlags::STOP_COPY), Ok(STP));
        assert_eq!(next_state(RUN, STP, MigFlags(3)), Ok(P2P));
        // hisi (STOP_COPY|PRE_COPY): PRE_COPY -> STOP_COPY is direct.
        assert_eq!(next_state(PC, SC, MigFlags(5)), Ok(SC));
        assert_eq!(next_state(PC, SC, MigFlags(7)), Ok(PCP));
    }
}
