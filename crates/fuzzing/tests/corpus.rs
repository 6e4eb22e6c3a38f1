//! Every committed input runs through its target on every CI run, without AFL++: the seed
//! corpora (`fuzz/corpus/TARGET/`, each must still be accepted) and every input that once
//! crashed a target (`fuzz/regressions/TARGET/`, each must now run without a panic).

use fuzzing::{Verdict, TARGETS};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

#[test]
fn every_target_has_seeds_and_accepts_them() {
    for t in TARGETS {
        let seeds = files(&root().join("corpus").join(t.name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{} is empty", t.name);
        for f in seeds {
            let data = std::fs::read(&f).unwrap();
            assert_eq!((t.run)(&data), Verdict::Accepted, "{}", f.display());
        }
    }
}

#[test]
fn every_crash_found_stays_fixed() {
    let dir = root().join("regressions");
    for d in files(&dir).into_iter().chain(
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir()),
    ) {
        if d.is_file() {
            panic!(
                "{}: regressions live in a directory named for their target",
                d.display()
            );
        }
        let name = d.file_name().unwrap().to_str().unwrap();
        let t = fuzzing::target(name).unwrap_or_else(|| panic!("{}: no such target", d.display()));
        for f in files(&d) {
            let data = std::fs::read(&f).unwrap();
            let _ = (t.run)(&data);
        }
    }
}

/// The iommufd crashes, call by call: the call that aborted on a 64 GiB (ALLOW_IOVAS with
/// 2^32 - 1 ranges) or 2^47-byte (a bitmap for a 2^62-byte range) allocation now fails with
/// the errno Linux gives, and nothing is allocated from the caller's count; a dirty bitmap of
/// zero length at IOVA 0, which underflowed sizing the bitmap, is refused.
#[test]
fn iommufd_crashes_end_in_their_errno() {
    use iommu::errno::{EFAULT, EINVAL, EOPNOTSUPP};
    let dir = root().join("regressions/iommufd-ioctl");
    for (file, last) in [
        ("allow-iovas-huge-count", EFAULT),
        ("dirty-bitmap-huge-range", EOPNOTSUPP),
        ("dirty-bitmap-zero-length", EINVAL),
    ] {
        let data = std::fs::read(dir.join(file)).unwrap();
        let calls = fuzzing::host::ioctl_calls(&data);
        let got = calls.last().unwrap().as_ref().unwrap_err();
        assert_eq!(*got, last, "{file}: {got}");
    }
}

/// The seeds are not accepted by accident: one flipped byte in the places a check guards
/// (a CRC, a length, a tag) is refused.
#[test]
fn a_seed_with_one_byte_wrong_is_refused() {
    let read = |t: &str, f: &str| std::fs::read(root().join("corpus").join(t).join(f)).unwrap();
    let run = |t: &str, d: &[u8]| (fuzzing::target(t).unwrap().run)(d);
    // A CRC-checked stream with one payload byte flipped.
    let mut s = read("frame-stream", "source-crc");
    let at = 1 + 24 + 2;
    s[at] ^= 1;
    assert_eq!(run("frame-stream", &s), Verdict::Refused);
    // The device state with a queue field changed and its checksum left alone.
    let mut a = read("accel-resume", "saved");
    let n = a.len();
    a[n - 10] ^= 0x40;
    assert_eq!(run("accel-resume", &a), Verdict::Refused);
    // The vCPU state with its checksum broken.
    let mut v = read("vcpu-state", "one-vcpu");
    let n = v.len();
    v[n - 1] ^= 1;
    assert_eq!(run("vcpu-state", &v), Verdict::Refused);
    // An unknown VFIO stream tag.
    let mut f = read("vfio-stream", "whole");
    f[1] ^= 0x80;
    assert_eq!(run("vfio-stream", &f), Verdict::Refused);
}

/// `fuzz/` is a workspace of its own, built with `--locked`: a dependency added to the main
/// workspace must reach its lock file too, or the fuzz smoke cannot build. Caught here, in
/// the test run, rather than at the end of CI.
#[test]
fn the_fuzz_lock_file_matches_the_workspace() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--locked", "--offline", "-q", "--manifest-path"])
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fuzz/Cargo.lock is out of date: run `cargo tree --manifest-path fuzz/Cargo.toml` and commit it\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
