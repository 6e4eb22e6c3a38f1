//! What ties a migration's frames to one handshake, and the clock both ends can share.

use std::sync::OnceLock;

/// A fresh random nonce for a `Hello`.
pub fn nonce() -> u64 {
    // Zero is the key of handshake frames; a nonce of 0 is as good as any other, but keep
    // the two apart so a derived key is never mistaken for "no key".
    rand::random::<u64>() | 1
}

/// The session key from the two `Hello` nonces. Every frame after the handshake carries it
/// in its CRC (`frame`), so a stream recorded from one session is refused by any other.
pub fn key(source: u64, destination: u64) -> u64 {
    // splitmix64 over both: any change to either nonce changes every bit of the key.
    let mut z = source ^ destination.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of one kernel, so a source
/// and a destination on the same host can time the guest's blackout across processes.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// This kernel's boot id, folded to 64 bits (0 when unreadable): equal ids mean the two
/// ends read the same monotonic clock.
pub fn boot_id() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).take(16).collect();
        u64::from_str_radix(&hex, 16).unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_both_nonces() {
        let k = key(1, 2);
        assert_ne!(k, key(1, 3));
        assert_ne!(k, key(3, 2));
        assert_ne!(k, key(2, 1));
        assert_ne!(k, 0);
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn the_clock_is_monotonic_and_the_boot_id_is_stable() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
        assert_eq!(boot_id(), boot_id());
        assert_ne!(boot_id(), 0, "/proc/sys/kernel/random/boot_id is readable here");
    }
}
